// libFuzzer target: the safetensors parser (io/safetensors_format.hpp) on arbitrary bytes. Every input must be
// either accepted with a header whose invariants hold, or refused with an IoError; anything else (a crash, a
// sanitizer report, another exception, an allocation sized by the input) is a finding.
#include <shardlm/io/safetensors_format.hpp>

#include <cstdlib>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace shardlm::io;
  SafetensorsHeader h;
  try {
    h = parse_safetensors(data, size, "input");
  } catch (const shardlm::IoError&) {
    return 0;
  }
  // Accepted: the tensors tile the data exactly and each size is shape x dtype.
  uint64_t covered = 0, data_size = size - h.data_start;
  for (const auto& t : h.tensors) {
    if (t.begin > t.end || t.end > data_size) std::abort();
    if (static_cast<uint64_t>(t.numel()) * t.element_size() != t.nbytes()) std::abort();
    covered += t.nbytes();
  }
  if (covered != data_size) std::abort();
  return 0;
}
