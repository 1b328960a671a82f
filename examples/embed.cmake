# Writes OUT (a header) holding the bytes of IN as shardlm::examples::embedded_corpus().
file(READ "${IN}" hex HEX)
string(LENGTH "${hex}" n)
math(EXPR bytes "${n} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "'\\\\x\\1'," body "${hex}")
string(REGEX REPLACE "(([^,]*,){32})" "\\1\n" body "${body}")
file(WRITE "${OUT}" "#pragma once\n// Generated from ${IN} by examples/embed.cmake.\n#include <string_view>\nnamespace shardlm::examples {\ninline constexpr char embedded_corpus_bytes[] = {\n${body}};\ninline std::string_view embedded_corpus() { return {embedded_corpus_bytes, ${bytes}}; }\n}  // namespace shardlm::examples\n")
