#pragma once
// JSON read from disk, and its fields checked as they are taken. Torch-free. Every JSON file shardlm reads goes
// through here (checkpoint meta.json, config.json, adapter_config.json, the safetensors index, tokenizer.json,
// --config):
//   read_json(path, limits)  a regular file (not a directory), at most limits.max_bytes, nested at most
//                            limits.max_depth deep: a hostile file is refused before the parser allocates for it
//                            (a parsed value costs tens of bytes per input byte, a nesting level more)
//   JsonFields<E>            the fields of one object: each taken with its type and range checked; an error, of type
//                            E, names the file, the key's path ("units[3].numel") and what was expected
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "shardlm/core/errors.hpp"
#include "shardlm/core/files.hpp"

namespace shardlm {

/// Parses `input` (a std::istream or JSON text); a parse error is an IoError "WHERE: malformed JSON: ...".
template <class Input>
nlohmann::json parse_json(Input&& input, const std::string& where) {
  try {
    return nlohmann::json::parse(std::forward<Input>(input));
  } catch (const nlohmann::json::exception& e) {
    fail<IoError>(where, ": malformed JSON: ", e.what());
  }
}

/// What a JSON file may hold before it is parsed. Real files are far inside these (config.json: kilobytes, 4 levels;
/// tokenizer.json: 9 MB for Llama 3, 33 MB for the largest vocabularies, 6 levels).
struct JsonLimits {
  uint64_t max_bytes = uint64_t{64} << 20;
  int max_depth = 64;
};

/// The byte offset at which `text` nests deeper than `max_depth` (arrays and objects), or npos. Strings are skipped
/// with their escapes, so brackets inside them do not count.
inline size_t json_too_deep_at(std::string_view text, int max_depth) {
  int depth = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '"') {
      for (++i; i < text.size() && text[i] != '"'; ++i)
        if (text[i] == '\\') ++i;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) return i;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return std::string_view::npos;
}

/// JSON text checked against `limits` before it is parsed (`where` names it in errors).
inline nlohmann::json parse_json_limited(std::string_view text, const std::string& where, const JsonLimits& limits) {
  if (text.size() > limits.max_bytes)
    fail<IoError>(where, ": ", text.size(), " bytes is over the limit of ", limits.max_bytes, " bytes for this file");
  if (const auto at = json_too_deep_at(text, limits.max_depth); at != std::string_view::npos)
    fail<IoError>(where, ": JSON nested more than ", limits.max_depth, " levels deep (at byte ", at, ")");
  return parse_json(text, where);
}

/// The JSON file at `path`, checked against `limits`; an IoError naming it if it is not a regular file, is too large
/// or too deep, or cannot be read or parsed.
inline nlohmann::json read_json(const std::filesystem::path& path, const JsonLimits& limits = {}) {
  const auto size = regular_file_size(path, "a JSON file");
  if (size > limits.max_bytes)
    fail<IoError>(path.string(), ": ", size, " bytes is over the limit of ", limits.max_bytes, " bytes for this file");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail<IoError>(path.string(), ": cannot open");
  std::string text(size, '\0');
  in.read(text.data(), static_cast<std::streamsize>(size));
  text.resize(static_cast<size_t>(in.gcount()));  // a file that shrank meanwhile: parsed as far as it goes
  return parse_json_limited(text, path.string(), limits);
}

/// The fields of one JSON object of a file, each checked as it is taken. `E` is the error type (IoError for a file
/// shardlm wrote, ConfigError for a configuration). Messages: "FILE: missing field 'units[3].numel'",
/// "FILE: field 'hidden_size' must be an integer in 1..1048576, got 4096.5".
template <class E = IoError>
class JsonFields {
 public:
  /// `j` must be an object; `file` names it, `path` is the object's place in it ("" at the top, "units[3]").
  JsonFields(const nlohmann::json& j, std::string file, std::string path = "")
      : j_(j), file_(std::move(file)), path_(std::move(path)) {
    if (!j_.is_object())
      fail<E>(file_, ": ", path_.empty() ? std::string("the file") : "field '" + path_ + "'", " must be a JSON object, got ",
              shown(j_));
  }
  /// The fields refer to the JSON: it must outlive them (keep read_json's result in a variable).
  JsonFields(nlohmann::json&&, std::string, std::string = "") = delete;

  const std::string& file() const { return file_; }
  /// The object's place in the file ("" at the top, "units[3]").
  const std::string& path() const { return path_; }
  /// The key's full name in messages: "units[3].numel".
  std::string name(std::string_view key) const { return path_.empty() ? std::string(key) : path_ + "." + std::string(key); }
  /// Whether the key is there with a value other than null.
  bool has(std::string_view key) const {
    const auto it = j_.find(key);
    return it != j_.end() && !it->is_null();
  }
  /// The value as it is (present and not null).
  const nlohmann::json& value(std::string_view key) const {
    if (!has(key)) fail<E>(file_, ": missing field '", name(key), "'");
    return *j_.find(key);
  }

  /// An integer in [lo, hi]; a float (4096.0 included), a string or a boolean is refused.
  int64_t integer(std::string_view key, int64_t lo, int64_t hi) const {
    const nlohmann::json& v = value(key);
    const bool in = v.is_number_integer() && !(v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX)) &&
                    v.get<int64_t>() >= lo && v.get<int64_t>() <= hi;
    if (!in) fail<E>(file_, ": field '", name(key), "' must be an integer in ", lo, "..", hi, ", got ", shown(v));
    return v.get<int64_t>();
  }
  int64_t integer_or(std::string_view key, int64_t fallback, int64_t lo, int64_t hi) const {
    return has(key) ? integer(key, lo, hi) : fallback;
  }

  /// A finite number in [lo, hi] (integers are numbers too).
  double number(std::string_view key, double lo, double hi) const {
    const nlohmann::json& v = value(key);
    const bool in = v.is_number() && std::isfinite(v.get<double>()) && v.get<double>() >= lo && v.get<double>() <= hi;
    if (!in) fail<E>(file_, ": field '", name(key), "' must be a number in [", lo, ", ", hi, "], got ", shown(v));
    return v.get<double>();
  }
  double number_or(std::string_view key, double fallback, double lo, double hi) const {
    return has(key) ? number(key, lo, hi) : fallback;
  }

  std::string string(std::string_view key) const {
    const nlohmann::json& v = value(key);
    if (!v.is_string()) fail<E>(file_, ": field '", name(key), "' must be a string, got ", shown(v));
    return v.get<std::string>();
  }
  std::string string_or(std::string_view key, std::string fallback) const {
    return has(key) ? string(key) : std::move(fallback);
  }

  bool boolean(std::string_view key) const {
    const nlohmann::json& v = value(key);
    if (!v.is_boolean()) fail<E>(file_, ": field '", name(key), "' must be true or false, got ", shown(v));
    return v.get<bool>();
  }
  bool boolean_or(std::string_view key, bool fallback) const { return has(key) ? boolean(key) : fallback; }

  /// The object at `key`, its fields checked the same way.
  JsonFields object(std::string_view key) const { return JsonFields(value(key), file_, name(key)); }
  /// The array at `key`.
  const nlohmann::json& array(std::string_view key) const {
    const nlohmann::json& v = value(key);
    if (!v.is_array()) fail<E>(file_, ": field '", name(key), "' must be a list, got ", shown(v));
    return v;
  }
  /// Element i of the array at `key` as an object ("units[3]").
  JsonFields element(std::string_view key, size_t i) const {
    return JsonFields(array(key).at(i), file_, detail::cat(name(key), "[", i, "]"));
  }

  /// A value as messages show it: numbers, booleans and short strings as written, anything else by its type.
  static std::string shown(const nlohmann::json& v) {
    if (v.is_number() || v.is_boolean()) return v.dump();
    if (v.is_string() && v.get_ref<const std::string&>().size() <= 40) return v.dump();
    if (v.is_string()) return "a string of " + std::to_string(v.get_ref<const std::string&>().size()) + " bytes";
    return std::string(v.is_array() ? "a list" : v.is_object() ? "an object" : v.type_name());
  }

 private:
  const nlohmann::json& j_;
  std::string file_, path_;
};

}  // namespace shardlm
