#pragma once
// JSON from a stream, a string or a file, parse errors turned into an IoError that names the source. Torch-free.
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>

#include "shardlm/core/errors.hpp"

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

/// The JSON file at `path`; an IoError naming it if it cannot be opened or parsed.
inline nlohmann::json read_json(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail<IoError>(path.string(), ": cannot open");
  return parse_json(in, path.string());
}

}  // namespace shardlm
