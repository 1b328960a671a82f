// shardlm_plot --metrics run.jsonl --output run.png [--width W --height H]
// Renders the curves of a trainer's metrics JSONL (--metrics) as a PNG: the training loss per step with the eval
// loss where there was an evaluation (top), and tokens/s per rank (bottom). Its own raster and 5x7 font, zlib
// for the PNG's deflate stream: no LibTorch, no Python.
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cxxopts.hpp>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "shardlm/core/errors.hpp"

namespace {

using shardlm::ConfigError;
using shardlm::IoError;
using shardlm::fail;

struct Rgb {
  uint8_t r, g, b;
};
constexpr Rgb kWhite{255, 255, 255}, kBlack{0, 0, 0}, kGrid{225, 225, 225}, kBlue{31, 119, 180}, kOrange{255, 127, 14},
    kGreen{44, 160, 44};

// 5x7 glyphs of the characters the plot writes ('#' = ink).
const std::map<char, std::array<const char*, 7>>& font() {
  static const std::map<char, std::array<const char*, 7>> f = {
      {'0', {" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "}},
      {'1', {"  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "}},
      {'2', {" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"}},
      {'3', {"#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "}},
      {'4', {"   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "}},
      {'5', {"#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "}},
      {'6', {"  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "}},
      {'7', {"#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "}},
      {'8', {" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "}},
      {'9', {" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "}},
      {'.', {"     ", "     ", "     ", "     ", "     ", " ##  ", " ##  "}},
      {'-', {"     ", "     ", "     ", "#####", "     ", "     ", "     "}},
      {'+', {"     ", "  #  ", "  #  ", "#####", "  #  ", "  #  ", "     "}},
      {'/', {"     ", "    #", "   # ", "  #  ", " #   ", "#    ", "     "}},
      {'(', {"   # ", "  #  ", " #   ", " #   ", " #   ", "  #  ", "   # "}},
      {')', {" #   ", "  #  ", "   # ", "   # ", "   # ", "  #  ", " #   "}},
      {',', {"     ", "     ", "     ", "     ", " ##  ", "  #  ", " #   "}},
      {':', {"     ", " ##  ", " ##  ", "     ", " ##  ", " ##  ", "     "}},
      {'a', {"     ", "     ", " ### ", "    #", " ####", "#   #", " ####"}},
      {'e', {"     ", "     ", " ### ", "#   #", "#####", "#    ", " ### "}},
      {'i', {"  #  ", "     ", " ##  ", "  #  ", "  #  ", "  #  ", " ### "}},
      {'k', {"#    ", "#    ", "#  # ", "# #  ", "##   ", "# #  ", "#  # "}},
      {'l', {" ##  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "}},
      {'n', {"     ", "     ", "# ## ", "##  #", "#   #", "#   #", "#   #"}},
      {'o', {"     ", "     ", " ### ", "#   #", "#   #", "#   #", " ### "}},
      {'p', {"     ", "     ", "#### ", "#   #", "#### ", "#    ", "#    "}},
      {'r', {"     ", "     ", "# ## ", "##  #", "#    ", "#    ", "#    "}},
      {'s', {"     ", "     ", " ####", "#    ", " ### ", "    #", "#### "}},
      {'t', {" #   ", " #   ", "###  ", " #   ", " #   ", " #  #", "  ## "}},
      {'v', {"     ", "     ", "#   #", "#   #", "#   #", " # # ", "  #  "}},
      {'M', {"#   #", "## ##", "# # #", "# # #", "#   #", "#   #", "#   #"}},
  };
  return f;
}

class Image {
 public:
  Image(int w, int h) : w_(w), h_(h), px_(static_cast<size_t>(w) * h, kWhite) {}
  void set(int x, int y, Rgb c) {
    if (x >= 0 && y >= 0 && x < w_ && y < h_) px_[static_cast<size_t>(y) * w_ + x] = c;
  }
  void rect(int x0, int y0, int x1, int y1, Rgb c) {
    for (int y = y0; y <= y1; ++y)
      for (int x = x0; x <= x1; ++x) set(x, y, c);
  }
  /// A line `thick` pixels wide (a square brush along Bresenham's path).
  void line(double x0, double y0, double x1, double y1, Rgb c, int thick = 1) {
    const int steps = static_cast<int>(std::max(std::abs(x1 - x0), std::abs(y1 - y0))) + 1;
    for (int i = 0; i <= steps; ++i) {
      const double t = static_cast<double>(i) / steps;
      const int x = static_cast<int>(std::lround(x0 + t * (x1 - x0))), y = static_cast<int>(std::lround(y0 + t * (y1 - y0)));
      rect(x - (thick - 1) / 2, y - (thick - 1) / 2, x + thick / 2, y + thick / 2, c);
    }
  }
  /// Text with its top-left corner at (x, y), glyphs scaled by `s`; returns its width.
  int text(int x, int y, std::string_view t, Rgb c, int s = 2) {
    for (size_t i = 0; i < t.size(); ++i) {
      const auto g = font().find(t[i]);
      if (g == font().end()) continue;  // a space, or a character the font lacks
      for (int row = 0; row < 7; ++row)
        for (int col = 0; col < 5; ++col)
          if (g->second[row][col] == '#') rect(x + (static_cast<int>(i) * 6 + col) * s, y + row * s, x + (static_cast<int>(i) * 6 + col) * s + s - 1, y + row * s + s - 1, c);
    }
    return static_cast<int>(t.size()) * 6 * s;
  }
  static int text_width(std::string_view t, int s = 2) { return static_cast<int>(t.size()) * 6 * s; }

  /// The image as a PNG (8-bit RGB, one zlib stream in one IDAT chunk).
  std::string png() const {
    std::string raw;
    raw.reserve(static_cast<size_t>(h_) * (3 * w_ + 1));
    for (int y = 0; y < h_; ++y) {
      raw += '\0';  // filter: none
      for (int x = 0; x < w_; ++x) {
        const auto& p = px_[static_cast<size_t>(y) * w_ + x];
        raw += static_cast<char>(p.r), raw += static_cast<char>(p.g), raw += static_cast<char>(p.b);
      }
    }
    uLongf size = compressBound(raw.size());
    std::string z(size, '\0');
    if (compress2(reinterpret_cast<Bytef*>(z.data()), &size, reinterpret_cast<const Bytef*>(raw.data()), raw.size(), 9) != Z_OK)
      fail<IoError>("zlib compress2 failed");
    z.resize(size);
    const auto be32 = [](uint32_t v) {
      return std::string{static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8), static_cast<char>(v)};
    };
    const auto chunk = [&](std::string_view type, const std::string& data) {
      const std::string body = std::string(type) + data;
      return be32(static_cast<uint32_t>(data.size())) + body +
             be32(static_cast<uint32_t>(crc32(0, reinterpret_cast<const Bytef*>(body.data()), static_cast<uInt>(body.size()))));
    };
    const std::string header = be32(static_cast<uint32_t>(w_)) + be32(static_cast<uint32_t>(h_)) + std::string("\x08\x02\x00\x00\x00", 5);
    return std::string("\x89PNG\r\n\x1a\n", 8) + chunk("IHDR", header) + chunk("IDAT", z) + chunk("IEND", "");
  }

 private:
  int w_, h_;
  std::vector<Rgb> px_;
};

struct Series {
  std::string name;
  Rgb color;
  std::vector<std::pair<double, double>> points;  // (step, value)
  bool dots = false;
};

/// Tick positions 1, 2 or 5 x 10^k apart, about `n` of them over [lo, hi].
std::vector<double> ticks(double lo, double hi, int n) {
  const double raw = (hi - lo) / n, mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double step = raw / mag < 1.5 ? mag : raw / mag < 3.5 ? 2 * mag : raw / mag < 7.5 ? 5 * mag : 10 * mag;
  std::vector<double> out;
  for (double t = std::ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push_back(std::abs(t) < step * 1e-9 ? 0 : t);
  return out;
}

std::string label(double v) {
  char buf[32];
  const double a = std::abs(v);
  if (a >= 1e6) std::snprintf(buf, sizeof buf, "%gM", v / 1e6);
  else if (a >= 1e4) std::snprintf(buf, sizeof buf, "%gk", v / 1e3);
  else std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

/// One panel: axes, grid, tick labels, a title with the legend, and the series, in the box (x0, y0)-(x1, y1).
void panel(Image& img, int x0, int y0, int x1, int y1, const std::string& title, const std::vector<Series>& series) {
  double sx0 = INFINITY, sx1 = -INFINITY, sy0 = INFINITY, sy1 = -INFINITY;
  for (const auto& s : series)
    for (const auto& [x, y] : s.points) sx0 = std::min(sx0, x), sx1 = std::max(sx1, x), sy0 = std::min(sy0, y), sy1 = std::max(sy1, y);
  if (!(sx0 <= sx1)) return;
  if (sx1 == sx0) sx0 -= 1, sx1 += 1;
  if (sy1 == sy0) sy0 -= std::max(1.0, std::abs(sy0) * 0.1), sy1 += std::max(1.0, std::abs(sy1) * 0.1);
  const double pad = (sy1 - sy0) * 0.05;
  sy0 -= pad, sy1 += pad;
  const int left = x0 + 90, right = x1 - 30, top = y0 + 30, bottom = y1 - 30;
  const auto px = [&](double x) { return left + (x - sx0) / (sx1 - sx0) * (right - left); };
  const auto py = [&](double y) { return bottom - (y - sy0) / (sy1 - sy0) * (bottom - top); };
  for (const double t : ticks(sy0, sy1, 5)) {
    const int y = static_cast<int>(std::lround(py(t)));
    img.line(left, y, right, y, kGrid);
    const auto l = label(t);
    img.text(left - 8 - Image::text_width(l), y - 7, l, kBlack);
  }
  for (const double t : ticks(sx0, sx1, 6)) {
    const int x = static_cast<int>(std::lround(px(t)));
    img.line(x, top, x, bottom, kGrid);
    const auto l = label(t);
    img.text(x - Image::text_width(l) / 2, bottom + 8, l, kBlack);
  }
  img.line(left, top, left, bottom, kBlack);
  img.line(left, bottom, right, bottom, kBlack);
  int x = left + img.text(left, y0 + 6, title, kBlack) + 24;
  for (const auto& s : series) {
    if (s.points.empty() || series.size() < 2) continue;
    img.rect(x, y0 + 11, x + 18, y0 + 13, s.color);
    x += 26 + img.text(x + 26, y0 + 6, s.name, s.color) + 20;
  }
  for (const auto& s : series) {
    for (size_t i = 0; i < s.points.size(); ++i) {
      const double X = px(s.points[i].first), Y = py(s.points[i].second);
      if (i > 0) img.line(px(s.points[i - 1].first), py(s.points[i - 1].second), X, Y, s.color, 2);
      if (s.dots) img.rect(static_cast<int>(X) - 3, static_cast<int>(Y) - 3, static_cast<int>(X) + 3, static_cast<int>(Y) + 3, s.color);
    }
  }
}

int run(int argc, char** argv) {
  cxxopts::Options opts("shardlm_plot", "Renders a trainer's metrics JSONL (loss, eval loss, tokens/s per step) as a PNG");
  opts.add_options()("metrics", "the JSONL file the trainer wrote (--metrics)", cxxopts::value<std::string>())(
      "output", "the PNG to write", cxxopts::value<std::string>())(
      "width", "image width in pixels", cxxopts::value<int>()->default_value("960"))(
      "height", "image height in pixels", cxxopts::value<int>()->default_value("720"))("h,help", "this help");
  const auto args = opts.parse(argc, argv);
  if (args.count("help")) {
    std::cout << opts.help() << '\n';
    return 0;
  }
  if (!args.unmatched().empty()) fail<ConfigError>("unexpected argument '", args.unmatched().front(), "'");
  for (const char* required : {"metrics", "output"})
    if (!args.count(required)) fail<ConfigError>("--", required, " is required");
  const int W = args["width"].as<int>(), H = args["height"].as<int>();
  if (W < 320 || H < 240 || W > 8000 || H > 8000) fail<ConfigError>("--width/--height: ", W, "x", H, " is outside 320x240 .. 8000x8000");
  const auto path = args["metrics"].as<std::string>();
  std::ifstream in(path);
  if (!in) fail<IoError>(path, ": cannot open");
  Series loss{"train", kBlue, {}}, eval{"eval", kOrange, {}, true}, speed{"tokens/s", kGreen, {}};
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json row;
    try {
      row = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      fail<IoError>(path, ":", n, ": malformed JSON: ", e.what());
    }
    const auto number = [&](const char* key) -> std::optional<double> {
      if (!row.is_object() || !row.contains(key) || row[key].is_null()) return std::nullopt;
      if (!row[key].is_number()) fail<IoError>(path, ":", n, ": '", key, "' is not a number");
      return row[key].get<double>();
    };
    const auto step = number("step");
    if (!step) fail<IoError>(path, ":", n, ": no \"step\" (not a shardlm metrics file?)");
    if (const auto v = number("loss"); v && std::isfinite(*v)) loss.points.emplace_back(*step, *v);
    if (const auto v = number("eval_loss"); v && std::isfinite(*v)) eval.points.emplace_back(*step, *v);
    if (const auto v = number("tokens_per_s"); v && std::isfinite(*v)) speed.points.emplace_back(*step, *v);
  }
  if (loss.points.empty()) fail<IoError>(path, ": no rows with a loss");
  Image img(W, H);
  const int split = H * 3 / 5;
  panel(img, 0, 0, W - 1, split, "loss", {loss, eval});
  panel(img, 0, split, W - 1, H - 22, "tokens/s per rank", {speed});
  img.text(W / 2 - Image::text_width("step") / 2, H - 20, "step", kBlack);
  const auto out = args["output"].as<std::string>();
  std::ofstream file(out, std::ios::binary | std::ios::trunc);
  file << img.png();
  if (!file) fail<IoError>(out, ": cannot write");
  std::cerr << "shardlm_plot: " << loss.points.size() << " steps, " << eval.points.size() << " evaluations -> " << out << '\n';
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const cxxopts::exceptions::exception& e) {
    std::cerr << "shardlm_plot: error: " << e.what() << " (see --help)\n";
  } catch (const std::exception& e) {
    std::cerr << "shardlm_plot: error: " << e.what() << '\n';
  }
  return 1;
}
