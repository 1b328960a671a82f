#pragma once
// Byte-level BPE (Llama 3's tokenizer) read from a Hugging Face tokenizer.json; encodes and decodes as the
// Hugging Face `tokenizers` library does (the reference: tests/data/check_tokenizer.py compares id for id).
//   encode(text): added tokens (`<|eot_id|>`, ...) written in the text are found first (leftmost, longest; tokens
//   marked `normalized: false` before the others, as `tokenizers` does); each stretch between them is split by the
//   pre-tokenizer regex (PCRE2, Unicode properties, look-ahead); each piece's bytes are merged by rank (lowest
//   rank first, leftmost among equals); with `ignore_merges` a piece that is itself a vocabulary token is that token.
//   Tokens are kept as raw bytes: GPT-2's byte-to-unicode alphabet only appears in tokenizer.json's strings.
// Torch-free (nlohmann json + PCRE2) so that the tokenizer and shardlm_tokenize build in seconds.
#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <queue>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "shardlm/core/errors.hpp"
#include "shardlm/core/json.hpp"

namespace shardlm::data {

namespace detail {

inline void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

/// Decodes the UTF-8 character at s[i] and advances i past it; nullopt (i unchanged) if it is not well formed
/// (truncated, overlong, a surrogate or above U+10FFFF).
inline std::optional<char32_t> next_utf8(std::string_view s, size_t& i) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char b0 = byte(i);
  if (b0 < 0x80) return ++i, char32_t{b0};
  const int len = b0 >= 0xF0 ? 4 : b0 >= 0xE0 ? 3 : b0 >= 0xC0 ? 2 : 0;
  if (len == 0 || i + len > s.size()) return std::nullopt;
  char32_t c = b0 & (0x7F >> len);
  for (int k = 1; k < len; ++k) {
    if ((byte(i + k) & 0xC0) != 0x80) return std::nullopt;
    c = (c << 6) | (byte(i + k) & 0x3F);
  }
  constexpr char32_t min_of_len[] = {0, 0, 0x80, 0x800, 0x10000};
  if (c < min_of_len[len] || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return std::nullopt;
  i += len;
  return c;
}

/// Byte offset of the first byte that is not well-formed UTF-8, or npos.
inline size_t invalid_utf8_at(std::string_view s) {
  for (size_t i = 0; i < s.size();)
    if (!next_utf8(s, i)) return i;
  return std::string_view::npos;
}

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <class V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

/// A compiled PCRE2 pattern, UTF + Unicode properties (\p{L}, \s as Unicode), JIT-compiled where available.
class Regex {
 public:
  Regex(const std::string& pattern, bool literal, const std::string& where) {
    int code = 0;
    PCRE2_SIZE offset = 0;
    const uint32_t options = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0u);
    code_.reset(pcre2_compile_8(reinterpret_cast<PCRE2_SPTR8>(pattern.data()), pattern.size(), options, &code,
                                &offset, nullptr),
                pcre2_code_free_8);
    if (!code_) {
      PCRE2_UCHAR8 message[256];
      pcre2_get_error_message_8(code, message, sizeof message);
      fail<IoError>(where, ": the pattern '", pattern, "' does not compile at offset ", offset, ": ",
                    reinterpret_cast<const char*>(message));
    }
    pcre2_jit_compile_8(code_.get(), PCRE2_JIT_COMPLETE);  // failure is fine: pcre2_match interprets instead
  }

  /// Calls piece(begin, end) for every match and every stretch between matches, in order ("Isolated" splitting).
  /// `s` must be valid UTF-8 (checked once by the caller: PCRE2 would otherwise re-check it at every match).
  template <class F>
  void split(std::string_view s, F&& piece) const {
    std::unique_ptr<pcre2_match_data_8, void (*)(pcre2_match_data_8*)> data(
        pcre2_match_data_create_from_pattern_8(code_.get(), nullptr), pcre2_match_data_free_8);
    if (!data) throw std::bad_alloc();
    const auto* subject = reinterpret_cast<PCRE2_SPTR8>(s.data());
    size_t pos = 0, last = 0;
    while (pos < s.size()) {
      const int rc = pcre2_match_8(code_.get(), subject, s.size(), pos, PCRE2_NO_UTF_CHECK, data.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) fail<Error>("pre-tokenizer regex: PCRE2 match error ", rc, " at byte ", pos);
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer_8(data.get());
      const size_t begin = ovector[0], end = ovector[1];
      if (end == begin) {  // an empty match splits nothing: go on after the next character
        pos = begin + 1;
        while (pos < s.size() && (static_cast<unsigned char>(s[pos]) & 0xC0) == 0x80) ++pos;
        continue;
      }
      if (begin > last) piece(last, begin);
      piece(begin, end);
      last = pos = end;
    }
    if (last < s.size()) piece(last, s.size());
  }

 private:
  std::shared_ptr<pcre2_code_8> code_{nullptr, pcre2_code_free_8};
};

}  // namespace detail

/// GPT-2's byte-level alphabet, in which tokenizer.json writes byte-level tokens: a printable Latin-1 byte stands
/// for itself, every other byte b for U+0100 + (its rank among those bytes), so a space is `Ġ` (U+0120).
inline const std::array<char32_t, 256>& byte_to_unicode() {
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> t{};
    char32_t next = 0x100;
    for (unsigned b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t[b] = printable ? char32_t(b) : next++;
    }
    return t;
  }();
  return table;
}

/// Bytes -> their byte-level string (UTF-8), as tokenizer.json writes them.
inline std::string byte_level_encode(std::string_view bytes) {
  std::string out;
  for (const unsigned char b : bytes) detail::append_utf8(out, byte_to_unicode()[b]);
  return out;
}

/// A byte-level string -> its bytes; nullopt if it holds a character outside the byte-level alphabet.
inline std::optional<std::string> byte_level_decode(std::string_view text) {
  static const std::array<int16_t, 0x144> inverse = [] {
    std::array<int16_t, 0x144> t;
    t.fill(-1);
    for (unsigned b = 0; b < 256; ++b) t[byte_to_unicode()[b]] = static_cast<int16_t>(b);
    return t;
  }();
  std::string out;
  for (size_t i = 0; i < text.size();) {
    const auto c = detail::next_utf8(text, i);
    if (!c || *c >= inverse.size() || inverse[*c] < 0) return std::nullopt;
    out += static_cast<char>(inverse[*c]);
  }
  return out;
}

/// A byte-level BPE tokenizer read from a Hugging Face tokenizer.json. encode keeps a cache of the pieces it has
/// merged: one Tokenizer must not encode from two threads at once (copies are independent).
class Tokenizer {
 public:
  /// What a tokenizer.json may be: the largest released ones are tens of megabytes, a few levels deep.
  static constexpr JsonLimits limits{uint64_t{1} << 28, 64};

  static Tokenizer from_file(const std::filesystem::path& path) {
    return from_json(read_json(path, limits), path.string());
  }

  /// `name` (the file) is what errors name: each field is checked as it is read (its type, an id's range).
  static Tokenizer from_json(const nlohmann::json& j, const std::string& name) {
    Tokenizer t;
    t.name_ = name;
    t.read(JsonFields<IoError>(j, name));
    return t;
  }

  /// The ids of `text` (valid UTF-8), with no special tokens added; added tokens written in the text are matched.
  std::vector<uint32_t> encode(std::string_view text) const {
    std::vector<uint32_t> ids;
    encode(text, ids);
    return ids;
  }

  /// Appends the ids of `text` to `ids`.
  void encode(std::string_view text, std::vector<uint32_t>& ids) const {
    if (const auto bad = detail::invalid_utf8_at(text); bad != std::string_view::npos)
      fail<IoError>("text is not valid UTF-8 at byte ", bad);
    split_added(text, 0, ids);
  }

  /// The text of `ids`: the bytes of each token, concatenated (may end inside a UTF-8 character).
  std::string decode(std::span<const uint32_t> ids) const {
    std::string out;
    for (const auto id : ids) {
      if (id >= token_bytes_.size() || token_bytes_[id].empty())
        fail<Error>("token id ", id, " is not in the vocabulary of ", name_);
      out += token_bytes_[id];
    }
    return out;
  }

  /// The id of an added token (by its content, e.g. `<|eot_id|>`) or of a vocabulary token (as tokenizer.json
  /// writes it, in the byte-level alphabet).
  std::optional<uint32_t> token_to_id(std::string_view token) const {
    for (const auto& set : added_)
      for (const auto& a : set.tokens)
        if (a.content == token) return a.id;
    if (const auto bytes = byte_level_decode(token))
      if (const auto it = vocab_.find(*bytes); it != vocab_.end()) return it->second;
    return std::nullopt;
  }

  /// One more than the largest id (the size of a model's embedding for this tokenizer).
  uint32_t vocab_size() const { return static_cast<uint32_t>(token_bytes_.size()); }
  const std::string& name() const { return name_; }

 private:
  struct Added {
    std::string content;
    uint32_t id;
  };
  struct AddedSet {
    std::vector<Added> tokens;  // longest first: the first one found at a position is the longest there
    std::string first_bytes;    // where a token may start (a scan jumps between these)
  };
  struct Merge {
    uint32_t rank, id;
  };
  static uint64_t pair_key(uint32_t a, uint32_t b) { return (uint64_t{a} << 32) | b; }
  // Bounds the cache on endless streams of distinct pieces (random strings, hashes): cleared when full.
  static constexpr size_t kCacheLimit = size_t{1} << 20;

  void read(const JsonFields<IoError>& j) {
    const auto model = j.object("model");
    const auto type = model.string_or("type", "BPE");
    if (type != "BPE")
      fail<IoError>(name_, ": model.type '", type, "' is not supported: shardlm reads byte-level BPE tokenizers");
    if (model.has("dropout") && model.number("dropout", 0, 1) != 0.0)
      fail<IoError>(name_, ": model.dropout is not supported (BPE dropout is for training a tokenizer)");
    for (const char* field : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (model.has(field) && !model.string(field).empty())
        fail<IoError>(name_, ": model.", field, " is not supported by byte-level BPE");
    if (model.boolean_or("byte_fallback", false)) fail<IoError>(name_, ": model.byte_fallback is not supported");
    ignore_merges_ = model.boolean_or("ignore_merges", false);

    if (j.has("normalizer"))
      fail<IoError>(name_, ": normalizer '", j.object("normalizer").string_or("type", "?"),
                    "' is not supported (byte-level BPE tokenizers have none)");
    if (!j.has("pre_tokenizer")) fail<IoError>(name_, ": no pre_tokenizer: byte-level BPE needs a ByteLevel pre-tokenizer");
    bool byte_level = false;
    read_pre_tokenizer(j.object("pre_tokenizer"), byte_level);
    if (!byte_level) fail<IoError>(name_, ": pre_tokenizer has no ByteLevel step: only byte-level BPE is supported");
    if (j.has("decoder") && j.object("decoder").string_or("type", "") != "ByteLevel")
      fail<IoError>(name_, ": decoder '", j.object("decoder").string_or("type", "?"), "' is not supported (expected ByteLevel)");

    // Ids index a table of tokens: one past the largest is what it allocates, so ids far beyond the number of
    // tokens the file defines (a hostile id of 2^31 would take 64 GB) are refused.
    const auto& vocab = model.value("vocab");
    if (!vocab.is_object())
      fail<IoError>(name_, ": field 'model.vocab' must be an object of token: id, got ", JsonFields<>::shown(vocab));
    const size_t added = j.has("added_tokens") ? j.array("added_tokens").size() : 0;
    max_id_ = static_cast<int64_t>(vocab.size() + added) + (int64_t{1} << 16);
    read_vocab(vocab);
    read_merges(model.array("merges"));
    if (added > 0) read_added(j);
  }

  void read_pre_tokenizer(const JsonFields<IoError>& p, bool& byte_level) {
    const auto type = p.string_or("type", "");
    const auto& where = p.path();
    if (byte_level) fail<IoError>(name_, ": ", where, " ('", type, "') comes after ByteLevel: not supported");
    if (type == "Sequence") {
      const auto& steps = p.array("pretokenizers");
      for (size_t i = 0; i < steps.size(); ++i) read_pre_tokenizer(p.element("pretokenizers", i), byte_level);
    } else if (type == "Split") {
      const auto behavior = p.string_or("behavior", "");
      if (behavior != "Isolated")
        fail<IoError>(name_, ": ", where, ": Split behavior '", behavior, "' is not supported (only Isolated)");
      if (p.boolean_or("invert", false)) fail<IoError>(name_, ": ", where, ": Split with invert is not supported");
      const auto pattern = p.object("pattern");
      if (pattern.has("Regex"))
        splits_.emplace_back(pattern.string("Regex"), false, name_ + ": " + where);
      else if (pattern.has("String"))
        splits_.emplace_back(pattern.string("String"), true, name_ + ": " + where);
      else
        fail<IoError>(name_, ": ", where, ".pattern has neither Regex nor String");
    } else if (type == "ByteLevel") {
      if (p.boolean_or("add_prefix_space", false))
        fail<IoError>(name_, ": ", where, ": ByteLevel add_prefix_space is not supported");
      // GPT-2's own split, which ByteLevel applies unless use_regex is false (Llama 3 splits with Split instead).
      if (p.boolean_or("use_regex", true))
        splits_.emplace_back(R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)", false,
                             name_ + ": " + where);
      byte_level = true;
    } else {
      fail<IoError>(name_, ": ", where, ": pre-tokenizer type '", type,
                    "' is not supported (supported: Sequence, Split, ByteLevel)");
    }
  }

  // Tokens are never empty (read_vocab and read_added refuse that), so an empty entry is an id nothing defines.
  void define(uint32_t id, std::string bytes) {
    if (id >= token_bytes_.size()) token_bytes_.resize(id + 1);
    token_bytes_[id] = std::move(bytes);
  }

  /// An id of `what`, checked against the ids the file may use (read()).
  uint32_t id_of(const nlohmann::json& value, const std::string& what) const {
    if (!value.is_number_integer() || value.get<int64_t>() < 0 || value.get<int64_t>() >= max_id_)
      fail<IoError>(name_, ": ", what, " = ", JsonFields<>::shown(value), " is not a valid id: expected an integer in 0..",
                    max_id_ - 1, " (the number of tokens in the file, plus 65536)");
    return static_cast<uint32_t>(value.get<int64_t>());
  }

  void read_vocab(const nlohmann::json& vocab) {
    vocab_.reserve(vocab.size());
    for (const auto& [token, value] : vocab.items()) {
      const auto id = id_of(value, "model.vocab['" + token + "']");
      if (token.empty()) fail<IoError>(name_, ": model.vocab has an empty token (id ", id, ")");
      auto bytes = byte_level_decode(token);
      if (!bytes) fail<IoError>(name_, ": model.vocab token '", token, "' is not in the byte-level alphabet");
      vocab_.emplace(*bytes, id);
      define(id, std::move(*bytes));
    }
    for (unsigned b = 0; b < 256; ++b) {
      const auto it = vocab_.find(std::string_view(reinterpret_cast<const char*>(&b), 1));
      if (it == vocab_.end())
        fail<IoError>(name_, ": model.vocab has no token for byte ", b, " ('", byte_level_encode(std::string(1, char(b))),
                      "'): byte-level BPE needs all 256");
      byte_id_[b] = it->second;
    }
  }

  void read_merges(const nlohmann::json& merges) {
    merges_.reserve(merges.size());
    for (size_t rank = 0; rank < merges.size(); ++rank) {
      const auto& m = merges[rank];
      std::string left, right;
      if (m.is_string()) {  // "a b" (tokenizer.json before tokenizers 0.20) or ["a", "b"]
        const auto s = m.get<std::string>();
        const auto space = s.find(' ');
        if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos)
          fail<IoError>(name_, ": model.merges[", rank, "] '", s, "' is not two tokens separated by one space");
        left = s.substr(0, space);
        right = s.substr(space + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        left = m[0].get<std::string>();
        right = m[1].get<std::string>();
      } else {
        fail<IoError>(name_, ": model.merges[", rank, "] is neither \"a b\" nor [\"a\", \"b\"]");
      }
      const auto id_of = [&](const std::string& token) {
        const auto bytes = byte_level_decode(token);
        const auto it = bytes ? vocab_.find(*bytes) : vocab_.end();
        if (it == vocab_.end()) fail<IoError>(name_, ": model.merges[", rank, "]: '", token, "' is not in the vocabulary");
        return it->second;
      };
      const auto a = id_of(left), b = id_of(right), merged = id_of(left + right);
      merges_.try_emplace(pair_key(a, b), Merge{static_cast<uint32_t>(rank), merged});  // the first rank wins
    }
  }

  void read_added(const JsonFields<IoError>& j) {
    const auto& list = j.array("added_tokens");
    for (size_t i = 0; i < list.size(); ++i) {
      const auto a = j.element("added_tokens", i);
      const auto where = name_ + ": added_tokens[" + std::to_string(i) + "]";
      const auto content = a.string("content");
      if (content.empty()) fail<IoError>(where, ": empty content");
      if (detail::invalid_utf8_at(content) != std::string::npos) fail<IoError>(where, ": content is not valid UTF-8");
      for (const char* flag : {"single_word", "lstrip", "rstrip"})
        if (a.boolean_or(flag, false)) fail<IoError>(where, " ('", content, "'): ", flag, " is not supported");
      const auto id = id_of(a.value("id"), a.name("id"));
      // Tokens matched on the raw text go first; normalized ones after (the same text here: no normalizer).
      auto& set = added_[a.boolean_or("normalized", true) ? 1 : 0];
      set.tokens.push_back({content, id});
      if (set.first_bytes.find(content[0]) == std::string::npos) set.first_bytes += content[0];
      define(id, content);
    }
    for (auto& set : added_)
      std::stable_sort(set.tokens.begin(), set.tokens.end(),
                       [](const Added& x, const Added& y) { return x.content.size() > y.content.size(); });
  }

  // Splits text at the added tokens of set `level` (leftmost, longest), then at the next set's, then pre-tokenizes.
  void split_added(std::string_view text, size_t level, std::vector<uint32_t>& ids) const {
    if (level == added_.size()) return pre_tokenize(text, 0, ids);
    const auto& set = added_[level];
    size_t last = 0;
    for (size_t pos = text.find_first_of(set.first_bytes); pos < text.size();
         pos = text.find_first_of(set.first_bytes, pos)) {
      const auto rest = text.substr(pos);
      const auto hit = std::find_if(set.tokens.begin(), set.tokens.end(),
                                    [&](const Added& a) { return rest.starts_with(a.content); });
      if (hit == set.tokens.end()) {
        ++pos;
        continue;
      }
      if (pos > last) split_added(text.substr(last, pos - last), level + 1, ids);
      ids.push_back(hit->id);
      pos = last = pos + hit->content.size();
    }
    if (last < text.size()) split_added(text.substr(last), level + 1, ids);
  }

  // Applies the pre-tokenizer's splits in order, then BPE to each piece.
  void pre_tokenize(std::string_view text, size_t level, std::vector<uint32_t>& ids) const {
    if (level == splits_.size()) return bpe(text, ids);
    splits_[level].split(text, [&](size_t b, size_t e) { pre_tokenize(text.substr(b, e - b), level + 1, ids); });
  }

  // One hash lookup for most pieces: the vocabulary (with ignore_merges a whole-token piece is that token, so the
  // cache never holds a copy of it), else the cache; the merge loop only for pieces not seen before.
  void bpe(std::string_view piece, std::vector<uint32_t>& ids) const {
    if (piece.size() == 1) return ids.push_back(byte_id_[static_cast<unsigned char>(piece[0])]);
    if (ignore_merges_)
      if (const auto it = vocab_.find(piece); it != vocab_.end()) return ids.push_back(it->second);
    if (const auto it = cache_.find(piece); it != cache_.end()) {
      ids.insert(ids.end(), it->second.begin(), it->second.end());
      return;
    }
    auto word = merge(piece);
    ids.insert(ids.end(), word.begin(), word.end());
    if (cache_.size() >= kCacheLimit) cache_.clear();
    cache_.emplace(std::string(piece), std::move(word));
  }

  // The merge loop: symbols in a linked list, candidate pairs in a min-heap by (rank, position); a popped pair
  // whose symbols changed since it was pushed is stale and skipped. O(n log n) in the piece's length.
  std::vector<uint32_t> merge(std::string_view piece) const {
    const auto n = static_cast<int32_t>(piece.size());
    struct Symbol {
      uint32_t id;
      int32_t prev, next;  // -1: none
      bool alive;
    };
    struct Candidate {
      uint32_t rank;
      int32_t left;
      uint32_t left_id, right_id, merged;
      bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
    };
    std::vector<Symbol> sym(n);
    for (int32_t i = 0; i < n; ++i) sym[i] = {byte_id_[static_cast<unsigned char>(piece[i])], i - 1, i + 1 < n ? i + 1 : -1, true};
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
    const auto push = [&](int32_t left) {
      if (left < 0 || sym[left].next < 0) return;
      const auto right = sym[left].next;
      if (const auto it = merges_.find(pair_key(sym[left].id, sym[right].id)); it != merges_.end())
        heap.push({it->second.rank, left, sym[left].id, sym[right].id, it->second.id});
    };
    for (int32_t i = 0; i + 1 < n; ++i) push(i);
    while (!heap.empty()) {
      const auto c = heap.top();
      heap.pop();
      auto& left = sym[c.left];
      if (!left.alive || left.id != c.left_id || left.next < 0) continue;
      auto& right = sym[left.next];
      if (right.id != c.right_id) continue;
      left.id = c.merged;
      right.alive = false;
      left.next = right.next;
      if (right.next >= 0) sym[right.next].prev = c.left;
      push(left.prev);
      push(c.left);
    }
    std::vector<uint32_t> word;
    for (int32_t i = 0; i >= 0; i = sym[i].next) word.push_back(sym[i].id);
    return word;
  }

  std::string name_;
  int64_t max_id_ = 0;  // ids are below this (read())
  bool ignore_merges_ = false;
  std::vector<detail::Regex> splits_;                  // the pre-tokenizer, applied in order
  detail::StringMap<uint32_t> vocab_;                  // token bytes -> id
  std::unordered_map<uint64_t, Merge> merges_;         // (left id, right id) -> rank and merged id
  std::array<uint32_t, 256> byte_id_{};                // byte -> its single-byte token
  std::array<AddedSet, 2> added_;                      // [0] matched on the raw text, [1] normalized
  std::vector<std::string> token_bytes_;               // id -> bytes (vocabulary and added tokens); empty: undefined
  mutable detail::StringMap<std::vector<uint32_t>> cache_;  // piece -> ids
};

}  // namespace shardlm::data
