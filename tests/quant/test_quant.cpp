// Quantization of frozen weights (quant/): error bounds on Gaussian weights, exact idempotence of
// dequantize(quantize(.)), rows quantized alone equal to the same rows of a whole weight (the streaming
// property), the byte layouts, ATen's e4m3 conversion, and the errors for bad inputs. CPU only; the CUDA kernel
// is compared with these paths by benchmarks/quant_benchmark.cpp (scripts/gpu.sh quant).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <shardlm/quant/policies.hpp>

#include <cmath>
#include <string>

using namespace shardlm;

namespace {

template <class P>
at::Tensor quantize(const at::Tensor& w) {
  auto out = at::empty({w.size(0) * P::row_bytes(w.size(1))}, at::kByte);
  P::quantize_rows(w, out);
  return out;
}
template <class P>
at::Tensor dequantize(const at::Tensor& q, int64_t rows, int64_t cols) {
  auto out = at::empty({rows, cols}, at::kBFloat16);
  P::dequantize_rows(q, cols, out);
  return out;
}
template <class P>
at::Tensor roundtrip(const at::Tensor& w) { return dequantize<P>(quantize<P>(w), w.size(0), w.size(1)); }

double rel_frobenius(const at::Tensor& approx, const at::Tensor& exact) {
  const auto e = exact.to(at::kDouble);
  return (approx.to(at::kDouble) - e).norm().item<double>() / e.norm().item<double>();
}

bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
         at::equal(a.contiguous().view(at::kShort), b.contiguous().view(at::kShort));
}

std::string error_of(auto&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

const std::vector<std::vector<int64_t>> shapes = {{64, 64}, {17, 192}, {256, 1024}, {32, 4096}};

}  // namespace

TEST_CASE("row bytes: int4 is 4.5 bits per value, fp8 8 bits + a 4-byte scale per row, rows padded to 16 bytes") {
  CHECK(quant::NoQuant::row_bytes(4096) == 8192);
  CHECK(quant::Int4::row_bytes(4096) == 2048 + 64 * 2 + 64 * 2);   // codes, low ends, high ends
  CHECK(quant::Int4::row_bytes(192) == 112);                         // 96 + 12 = 108, padded
  CHECK(quant::FP8::row_bytes(4096) == 4112);                        // 4096 + 4, padded
  CHECK(quant::Int4::row_bytes(53248) * 16384 == int64_t{16384} * 53248 * 9 / 16);
}

TEST_CASE("error bounds on Gaussian weights: int4 (group 64) < 0.1, fp8 < 0.05 relative Frobenius error") {
  at::manual_seed(1);
  for (const auto& shape : shapes) {
    for (const double std : {1.0, 0.02}) {
      const auto w = at::randn(shape) * std;
      auto rtn_q = at::empty({shape[0] * quant::Int4::row_bytes(shape[1])}, at::kByte);
      quant::Int4::quantize_rows(w, rtn_q, "w", quant::int4::FitOptions{.iters = 0});  // min-max round to nearest
      const double rtn = rel_frobenius(dequantize<quant::Int4>(rtn_q, shape[0], shape[1]), w);
      const double int4 = rel_frobenius(roundtrip<quant::Int4>(w), w);
      const double fp8 = rel_frobenius(roundtrip<quant::FP8>(w), w);
      MESSAGE("[", shape[0], ", ", shape[1], "] std ", std, ": int4 ", int4, " (min-max ", rtn, "), fp8 ", fp8);
      CHECK(int4 < 0.1);
      CHECK(int4 < rtn - 0.003);  // the fitted grids are clearly better than min-max
      CHECK(fp8 < 0.05);
    }
  }
  // bf16 inputs quantize like their fp32 values.
  const auto wb = (at::randn({17, 192}) * 0.02).to(at::kBFloat16);
  CHECK(bitwise_equal(roundtrip<quant::Int4>(wb), roundtrip<quant::Int4>(wb.to(at::kFloat))));
  CHECK(bitwise_equal(roundtrip<quant::FP8>(wb), roundtrip<quant::FP8>(wb.to(at::kFloat))));
}

TEST_CASE_TEMPLATE("dequantize(quantize(.)) is exactly idempotent", P, quant::Int4, quant::FP8) {
  at::manual_seed(2);
  for (const auto& shape : std::vector<std::vector<int64_t>>{{17, 192}, {128, 1024}}) {
    for (const auto dtype : {at::kFloat, at::kBFloat16}) {
      for (const double std : {1.0, 3e-5}) {
        const auto w = (at::randn(shape) * std + (std * 0.1)).to(dtype);
        const auto once = roundtrip<P>(w);
        CHECK_MESSAGE(bitwise_equal(roundtrip<P>(once), once), P::name, " [", shape[0], ", ", shape[1], "] ",
                      dtype_name(dtype), " std ", std);
        CHECK(bitwise_equal(roundtrip<P>(once.to(at::kFloat)), once));  // the same values as fp32
      }
    }
  }
}

TEST_CASE_TEMPLATE("rows quantized alone give the bytes of the same rows of the whole weight", P, quant::NoQuant,
                   quant::Int4, quant::FP8) {
  at::manual_seed(3);
  const int64_t rows = 37, cols = 320, rb = P::row_bytes(cols);
  const auto w = at::randn({rows, cols}) * 0.02;
  const auto whole = quantize<P>(w);
  for (const auto& [a, b] : std::vector<std::pair<int64_t, int64_t>>{{0, 1}, {5, 18}, {18, 37}, {36, 37}}) {
    const auto part = quantize<P>(w.narrow(0, a, b - a));
    CHECK_MESSAGE(at::equal(part, whole.narrow(0, a * rb, (b - a) * rb)), P::name, " rows ", a, "..", b);
    // A slice of a gathered buffer dequantizes alone.
    CHECK(bitwise_equal(dequantize<P>(whole.narrow(0, a * rb, (b - a) * rb), b - a, cols),
                        dequantize<P>(whole, rows, cols).narrow(0, a, b - a)));
  }
}

TEST_CASE("int4 layout: packed nibbles, then bf16 low and high ends; a group on its grid is kept exactly") {
  const auto w = (at::arange(64, at::kFloat).remainder(16) * 0.5f - 2.0f).view({1, 64});  // levels -2, -1.5 .. 5.5
  const auto q = quantize<quant::Int4>(w);
  REQUIRE(q.numel() == 48);
  CHECK(q[0].item<uint8_t>() == 0x10);  // values 0 (code 0) and 1 (code 1)
  CHECK(q[7].item<uint8_t>() == 0xfe);  // values 14 and 15
  CHECK(q.narrow(0, 32, 2).view(at::kBFloat16).item<float>() == -2.0f);
  CHECK(q.narrow(0, 34, 2).view(at::kBFloat16).item<float>() == 5.5f);
  CHECK(at::equal(q.narrow(0, 36, 12), at::zeros({12}, at::kByte)));  // padding
  CHECK(bitwise_equal(roundtrip<quant::Int4>(w), w.to(at::kBFloat16)));
  // A constant group: its grid collapses to one value, reproduced exactly.
  const auto c = at::full({2, 128}, 0.375f);
  CHECK(bitwise_equal(roundtrip<quant::Int4>(c), c.to(at::kBFloat16)));
  CHECK(bitwise_equal(roundtrip<quant::Int4>(at::zeros({1, 64})), at::zeros({1, 64}, at::kBFloat16)));
}

TEST_CASE("fp8: ATen's e4m3fn saturates only at 448 (NaN above), so codes are clamped; power-of-two row scales") {
  // What this LibTorch does: e4m3fn exists, 448 is the largest finite value, 464 and up and infinities become NaN.
  const auto probe = at::tensor({448.0f, 464.0f, 480.0f, INFINITY, -1000.0f}).to(at::kFloat8_e4m3fn).to(at::kFloat);
  CHECK(probe[0].item<float>() == 448.0f);
  CHECK(std::isnan(probe[2].item<float>()));
  CHECK(std::isnan(probe[3].item<float>()));
  CHECK(std::isnan(probe[4].item<float>()));
  // Our codes stay finite, whatever the magnitude; the largest lies in [224, 448].
  const auto w = at::tensor({1e30f, -3e29f, 1.0f, 0.0f, 7e-3f, -2.5e25f, 1e20f, 5.0f}).view({2, 4});
  const auto q = quantize<quant::FP8>(w);
  const auto codes = q.view({2, 16}).narrow(1, 0, 4).contiguous().view(at::kFloat8_e4m3fn).to(at::kFloat);
  CHECK(at::isfinite(codes).all().item<bool>());
  const auto amax = codes.abs().amax(1);
  CHECK((amax >= 224).all().item<bool>());
  CHECK((amax <= 448).all().item<bool>());
  const auto scale = q.view({2, 16}).narrow(1, 4, 4).contiguous().view(at::kFloat);
  for (int r = 0; r < 2; ++r) {
    int e = 0;
    CHECK(std::frexp(scale[r].item<float>(), &e) == 0.5f);  // a power of two
  }
  CHECK(at::isfinite(roundtrip<quant::FP8>(w).to(at::kFloat)).all().item<bool>());
  // A hand-made row: codes 0x7e (448), 0xb8 (-1.0), 0x01 (2^-9); scale 2^-8.
  auto in = at::zeros({16}, at::kByte);
  in[0] = 0x7e, in[1] = 0xb8, in[2] = 0x01;
  in.narrow(0, 4, 4).copy_(at::tensor({0.00390625f}).view(at::kByte));
  const auto out = dequantize<quant::FP8>(in, 1, 4).to(at::kFloat);
  CHECK(out[0][0].item<float>() == 1.75f);
  CHECK(out[0][1].item<float>() == -0.00390625f);
  CHECK(out[0][2].item<float>() == std::ldexp(1.0f, -17));
  CHECK(out[0][3].item<float>() == 0.0f);
  // An all-zero row.
  CHECK(bitwise_equal(roundtrip<quant::FP8>(at::zeros({1, 32})), at::zeros({1, 32}, at::kBFloat16)));
}

TEST_CASE("NoQuant is a bf16 copy") {
  const auto w = at::randn({5, 24}).to(at::kBFloat16);
  const auto q = quantize<quant::NoQuant>(w);
  CHECK(q.numel() == 5 * 48);
  CHECK(bitwise_equal(dequantize<quant::NoQuant>(q, 5, 24), w));
}

TEST_CASE("bad inputs are refused with a message that names the weight and what was expected") {
  const auto w = at::randn({4, 100});
  CHECK(error_of([&] { quant::Int4::quantize_rows(w, at::empty({4 * 64}, at::kByte), "layers.0.mlp.up_proj.weight"); }) ==
        "int4 quantizes groups of 64 values along a row: layers.0.mlp.up_proj.weight has 100 columns, not a multiple "
        "of 64 (keep this weight unquantized with NoQuant)");
  CHECK(error_of([&] { quant::Int4::dequantize_rows(at::empty({64}, at::kByte), 100, at::empty({1, 100}, at::kBFloat16)); })
            .find("has 100 columns, not a multiple of 64") != std::string::npos);
  const auto v = at::randn({4, 128});
  CHECK(error_of([&] { quant::FP8::quantize_rows(v, at::empty({10}, at::kByte), "q"); }) ==
        "fp8 quantization of q: the output holds 10 bytes, 4 rows of 128 columns need 576 (144 per row)");
  CHECK(error_of([&] { quant::Int4::quantize_rows(v, at::empty({4 * 80}, at::kFloat), "q"); }) ==
        "int4 quantization of q: the output must be a contiguous uint8 buffer, got fp32");
  CHECK(error_of([&] { quant::FP8::quantize_rows(v.to(at::kInt), at::empty({576}, at::kByte), "q"); }) ==
        "fp8 quantization of q: expected fp32, bf16 or fp16 values, got int32");
  CHECK(error_of([&] { quant::FP8::quantize_rows(v.view({4, 2, 64}), at::empty({576}, at::kByte), "q"); }) ==
        "fp8 quantization of q: expected a matrix [rows, cols], got 3 dimensions");
  CHECK(error_of([&] { quant::FP8::quantize_rows(v, at::empty({576}, at::TensorOptions(at::kByte).device(at::kMeta)), "q"); }) ==
        "fp8 quantization of q: the output is on meta, the weight on cpu");
  auto bad = v.clone();
  bad[1][3] = NAN;
  CHECK(error_of([&] { quant::Int4::quantize_rows(bad, at::empty({4 * 80}, at::kByte), "q"); }) ==
        "int4 quantization of q: the weight holds non-finite values (inf or NaN)");
  CHECK(error_of([&] { quant::FP8::dequantize_rows(at::empty({576}, at::kByte), 128, at::empty({4, 128}, at::kFloat), "q"); }) ==
        "fp8 dequantization of q: the output must be contiguous bf16, got fp32");
  CHECK(error_of([&] { quant::FP8::dequantize_rows(at::empty({570}, at::kByte), 128, at::empty({4, 128}, at::kBFloat16), "q"); }) ==
        "fp8 dequantization of q: the input holds 570 bytes, 4 rows of 128 columns need 576 (144 per row)");
  CHECK(error_of([&] { quant::Int4::dequantize_rows(at::empty({320}, at::kByte), 128, at::empty({4, 64}, at::kBFloat16), "q"); }) ==
        "int4 dequantization of q: the output must be a matrix [rows, 128], got [4, 64]");
  CHECK(error_of([&] { quant::dispatch("int3", [](auto) { return 0; }); }) ==
        "--quant 'int3' is not a quantization policy: use none, int4 or fp8");
  CHECK(quant::dispatch("fp8", [](auto p) { return std::string(decltype(p)::name); }) == "fp8");
}
