#pragma once
// Names of dtypes as users write them on the command line and as they appear in messages.
#include <c10/core/ScalarType.h>

#include <string>
#include <string_view>

#include "shardlm/core/errors.hpp"

namespace shardlm {

/// "fp32" | "bf16" | "fp16" (also the torch spellings "float32", "bfloat16", "float16").
inline c10::ScalarType parse_dtype(std::string_view name, std::string_view what = "dtype") {
  if (name == "fp32" || name == "float32" || name == "float") return c10::kFloat;
  if (name == "bf16" || name == "bfloat16") return c10::kBFloat16;
  if (name == "fp16" || name == "float16" || name == "half") return c10::kHalf;
  fail<ConfigError>(what, " '", name, "' is not a dtype: use fp32, bf16 or fp16");
}

inline std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return "fp32";
    case c10::kBFloat16: return "bf16";
    case c10::kHalf: return "fp16";
    case c10::kDouble: return "fp64";
    case c10::kLong: return "int64";
    case c10::kInt: return "int32";
    default: return c10::toString(t);
  }
}

}  // namespace shardlm
