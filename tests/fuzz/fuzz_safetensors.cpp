// libFuzzer target: the safetensors parser (io/safetensors_format.hpp) on arbitrary bytes. Every input must be
// either accepted with a header whose invariants hold, or refused with an IoError; anything else (a crash, a
// sanitizer report, another exception, an allocation sized by the input) is a finding.
#include <shardlm/io/safetensors_format.hpp>

#include <algorithm>
#include <cstdlib>
#include <utility>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace shardlm::io;
  SafetensorsHeader h;
  try {
    h = parse_safetensors(data, size, "input");
  } catch (const shardlm::IoError&) {
    return 0;
  }
  // Accepted: each size is shape x dtype, and the tensors, in offset order, tile the data exactly.
  const uint64_t data_size = size - h.data_start();
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& t : h.tensors) {
    if (t.begin > t.end || static_cast<uint64_t>(t.numel()) * t.element_size() != t.nbytes()) std::abort();
    ranges.emplace_back(t.begin, t.end);
  }
  std::sort(ranges.begin(), ranges.end());
  uint64_t pos = 0;
  for (const auto& [begin, end] : ranges) {
    if (begin != pos) std::abort();  // an overlap or a hole
    pos = end;
  }
  if (pos != data_size) std::abort();
  return 0;
}
