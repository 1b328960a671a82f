// shardlm_inspect FILE.safetensors|DIR [--summary]
// Validates safetensors files and lists their tensors (name, dtype, shape, bytes) and metadata. For a directory
// with model.safetensors.index.json it also checks the index: every file it names exists and holds the tensors
// listed for it, no tensor sits in two files, no file holds tensors the index does not list; then prints totals.
// A bad file or index is one error line naming the file and the problem, and exit code 1.
// No LibTorch: only the format's parser (io/safetensors_format.hpp), so it builds in seconds.
#include <shardlm/io/safetensors_format.hpp>

#include <cstdio>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using namespace shardlm;

namespace {

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string human_bytes(uint64_t n) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1000 && u < 4) v /= 1000, ++u;
  char buf[32];
  std::snprintf(buf, sizeof buf, u ? "%.2f %s" : "%.0f %s", v, units[u]);
  return buf;
}

struct Totals {
  uint64_t files = 0, tensors = 0, params = 0, bytes = 0;
  std::map<std::string, uint64_t> params_by_dtype;
  void add(const io::SafetensorsReader& f) {
    ++files;
    for (const auto& t : f.tensors()) {
      ++tensors, params += static_cast<uint64_t>(t.numel()), bytes += t.nbytes();
      params_by_dtype[t.dtype] += static_cast<uint64_t>(t.numel());
    }
  }
  void print(const std::string& what) const {
    std::cout << what << ": " << files << " file(s), " << tensors << " tensors, " << params << " parameters (";
    bool first = true;
    for (const auto& [dtype, n] : params_by_dtype) std::cout << (first ? "" : ", ") << dtype << " " << n, first = false;
    std::cout << "), " << bytes << " bytes of data (" << human_bytes(bytes) << ")\n";
  }
};

void list(const io::SafetensorsReader& f, bool summary) {
  std::cout << f.path().string() << ": " << f.tensors().size() << " tensors, " << f.file_size() - f.data_start()
            << " bytes of data, header " << f.header_bytes() << " bytes\n";
  for (const auto& [k, v] : f.metadata()) std::cout << "  metadata " << k << " = " << v << '\n';
  if (summary) return;
  size_t width = 0;
  for (const auto& t : f.tensors()) width = std::max(width, t.name.size());
  for (const auto& t : f.tensors()) {
    std::string name = t.name;
    name.resize(width, ' ');
    std::cout << "  " << name << "  " << t.dtype << std::string(t.dtype.size() < 7 ? 7 - t.dtype.size() : 0, ' ')
              << "  " << shape_text(t.shape) << "  " << t.nbytes() << " bytes\n";
  }
}

/// A directory: the index's files (or every *.safetensors file without one), each validated and listed, the
/// index checked against what the files hold.
void inspect_dir(const fs::path& dir, bool summary) {
  const auto index = dir / "model.safetensors.index.json";
  std::map<std::string, std::string> weight_map;
  std::set<std::string> files;
  const bool indexed = fs::exists(index);
  if (indexed) {
    weight_map = io::read_weight_map(index);
    for (const auto& [name, file] : weight_map) files.insert(file);
    for (const auto& file : files)
      if (!fs::is_regular_file(dir / file))
        fail<IoError>(index.string(), ": weight_map names file '", file, "', which does not exist in ", dir.string());
  } else {
    for (const auto& e : fs::directory_iterator(dir))
      if (e.path().extension() == ".safetensors") files.insert(e.path().filename().string());
    if (files.empty()) fail<IoError>(dir.string(), ": no model.safetensors.index.json and no .safetensors file");
  }
  Totals totals;
  std::map<std::string, std::string> holder;  // tensor -> the file holding it
  for (const auto& file : files) {
    io::SafetensorsReader f(dir / file);
    list(f, summary);
    totals.add(f);
    for (const auto& t : f.tensors()) {
      const auto [it, fresh] = holder.emplace(t.name, file);
      if (!fresh)
        fail<IoError>(dir.string(), ": tensor '", t.name, "' is held by two files: ", it->second, " and ", file);
      if (indexed && !weight_map.count(t.name))
        fail<IoError>((dir / file).string(), ": holds tensor '", t.name, "', which the index does not list");
      if (indexed && weight_map[t.name] != file)
        fail<IoError>(index.string(), ": lists tensor '", t.name, "' in ", weight_map[t.name], " but ", file, " holds it");
    }
  }
  for (const auto& [name, file] : weight_map)
    if (!holder.count(name))
      fail<IoError>((dir / file).string(), ": the index lists tensor '", name, "' here but the file does not hold it");
  if (indexed) std::cout << index.string() << ": " << weight_map.size() << " tensors in " << files.size() << " files, consistent\n";
  totals.print(dir.string());
}

int run(int argc, char** argv) {
  std::vector<std::string> paths;
  bool summary = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::cout << "usage: shardlm_inspect [--summary] FILE.safetensors|DIR\n"
                   "  validates safetensors files and lists tensors (name, dtype, shape, bytes) and metadata;\n"
                   "  for a model directory also checks model.safetensors.index.json and prints totals\n"
                   "  --summary  one line per file instead of one per tensor\n";
      return 0;
    }
    if (a == "--summary") summary = true;
    else if (a.rfind("-", 0) == 0) fail<Error>("unknown option '", a, "' (see --help)");
    else paths.push_back(a);
  }
  if (paths.size() != 1) fail<Error>("expected one FILE.safetensors or model directory (see --help)");
  const fs::path path = paths[0];
  if (!fs::exists(path)) fail<IoError>(path.string(), ": does not exist");
  if (fs::is_directory(path)) {
    inspect_dir(path, summary);
  } else {
    io::SafetensorsReader f(path);
    list(f, summary);
    Totals totals;
    totals.add(f);
    totals.print(path.string());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "shardlm_inspect: error: " << e.what() << '\n';
  }
  return 1;
}
