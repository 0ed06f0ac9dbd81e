// flashcore-run: sample images from an exported flashcore sampler (a .pt2 package
// written by `flashcore export --format pt2`) without Python.
//
//   flashcore-run student.pt2 --labels 0,1,2 --seed 0 --out grid.png [--runs N] [--threads N] [--raw x0.f32]
//                 [--serve]
//
// The package maps (x_T (B, C, H, W) float32, labels (B,) int64) -> x0. The noise is
// drawn here with at::randn on the CPU generator seeded by --seed, the draw
// torch.manual_seed(seed); torch.randn(...) makes in Python, so the images equal
// Python's for the same seed. The flashcore_C ops the package calls are registered
// by libflashcore_C.so, linked into this binary (docs/deploy.md).
//
// Prints the time to the first image (from the start of main: loading the package
// included), the per-image latency of --runs further calls, its peak RSS, and whether a libpython
// is mapped into this process (it must not be). --serve (for bench/bench_deploy.py, which
// times this process side by side with in-process providers): after the first image,
// one more call per line read from stdin, each answered "ok <ms>" on stdout; the summary
// follows at end of input. Any failure: one line
// "flashcore-run: error: ..." and exit status 1; a malformed command line: exit 2.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "png.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Usage : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Args {
  std::string artifact, out = "grid.png", raw;
  std::vector<int64_t> labels;
  uint64_t seed = 0;
  int runs = 5;
  int threads = 0;   // 0: libtorch's default (OMP_NUM_THREADS, else the cores)
  bool serve = false;
};

int64_t parse_int(const std::string& s, const std::string& what) {
  size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != s.size()) throw Usage(what + ": not an integer: '" + s + "'");
  return v;
}

Args parse(int argc, char** argv) {
  Args a;
  bool have_labels = false;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw Usage(k + " needs a value");
      return argv[++i];
    };
    if (k == "--labels") {
      std::string v = value(), item;
      have_labels = true;
      for (size_t at = 0; at <= v.size(); ++at) {
        if (at == v.size() || v[at] == ',') {
          a.labels.push_back(parse_int(item, "--labels"));
          item.clear();
        } else {
          item += v[at];
        }
      }
    } else if (k == "--seed") {
      int64_t s = parse_int(value(), "--seed");
      if (s < 0) throw Usage("--seed must be >= 0");
      a.seed = static_cast<uint64_t>(s);
    } else if (k == "--out") {
      a.out = value();
    } else if (k == "--threads") {
      a.threads = static_cast<int>(parse_int(value(), "--threads"));
      if (a.threads < 1) throw Usage("--threads must be >= 1");
    } else if (k == "--serve") {
      a.serve = true;
    } else if (k == "--raw") {
      a.raw = value();
    } else if (k == "--runs") {
      a.runs = static_cast<int>(parse_int(value(), "--runs"));
      if (a.runs < 0) throw Usage("--runs must be >= 0");
    } else if (!k.empty() && k[0] == '-') {
      throw Usage("unknown option " + k);
    } else if (a.artifact.empty()) {
      a.artifact = k;
    } else {
      throw Usage("more than one artifact given");
    }
  }
  if (a.artifact.empty()) throw Usage("no artifact given");
  if (!have_labels) throw Usage("--labels is required");
  return a;
}

// the first line of an exception's text (c10 errors append a C++ backtrace)
std::string first_line(const std::string& s) {
  return s.substr(0, s.find('\n'));
}

// is a libpython mapped into this process? (the point of the runner: it must not be)
std::string libpython_mapped() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    auto at = line.find("libpython");
    if (at != std::string::npos) return line.substr(line.find('/'));
  }
  return "";
}

// this process's peak resident set (VmHWM) in MiB: the exec'd image's own, unlike a
// parent's wait4 figure, which on Linux keeps the forking parent's high-water mark
double peak_rss_mib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return -1;
}

int64_t meta_int(const std::unordered_map<std::string, std::string>& meta, const std::string& key,
                 const std::string& artifact) {
  auto it = meta.find("flashcore." + key);
  if (it == meta.end())
    throw Failure(artifact + " is not a flashcore export (no flashcore." + key + " in its metadata)");
  return parse_int(it->second, "metadata flashcore." + key);
}

// x0 (B, C, H, W) in [-1, 1] as one row of images, 2-pixel white padding: the pixels
// flashcore.images.grid(x0, nrow=B) makes
std::vector<uint8_t> grid(const at::Tensor& x0, int& width, int& height) {
  const int64_t b = x0.size(0), c = x0.size(1), h = x0.size(2), w = x0.size(3), pad = 2;
  at::Tensor u8 = ((x0.clamp(-1, 1) + 1) * 127.5).round().to(at::kByte).permute({0, 2, 3, 1}).contiguous();
  width = static_cast<int>(b * (w + pad) + pad);
  height = static_cast<int>(h + 2 * pad);
  std::vector<uint8_t> out(static_cast<size_t>(width) * height * c, 255);
  const uint8_t* p = u8.data_ptr<uint8_t>();
  for (int64_t i = 0; i < b; ++i)
    for (int64_t y = 0; y < h; ++y)
      std::copy(p + ((i * h + y) * w) * c, p + ((i * h + y + 1) * w) * c,
                out.begin() + ((pad + y) * width + pad + i * (w + pad)) * c);
  return out;
}

int run(const Args& a, Clock::time_point start) {
  if (!std::ifstream(a.artifact).good()) throw Failure("cannot read " + a.artifact);
  if (a.threads > 0) at::set_num_threads(a.threads);
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  try {
    loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(a.artifact);
  } catch (const std::exception& e) {
    throw Failure("cannot load " + a.artifact + " as an AOTInductor package: " + first_line(e.what()));
  }
  auto meta = loader->get_metadata();
  const int64_t b = meta_int(meta, "batch", a.artifact), classes = meta_int(meta, "num_classes", a.artifact);
  const int64_t c = meta_int(meta, "channels", a.artifact), h = meta_int(meta, "height", a.artifact),
                w = meta_int(meta, "width", a.artifact);
  if (static_cast<int64_t>(a.labels.size()) != b)
    throw Failure(a.artifact + " was exported for batch " + std::to_string(b) + ", got " +
                  std::to_string(a.labels.size()) + " labels (re-export with --batch " +
                  std::to_string(a.labels.size()) + ")");
  for (int64_t l : a.labels)
    if (l < 0 || l >= classes)
      throw Failure("label " + std::to_string(l) + " out of range: the model has classes 0.." +
                    std::to_string(classes - 1));

  at::manual_seed(a.seed);
  at::Tensor x_T = at::randn({b, c, h, w});
  at::Tensor labels = at::tensor(a.labels, at::kLong);
  std::vector<at::Tensor> out;
  try {
    out = loader->run({x_T, labels});
  } catch (const std::exception& e) {
    throw Failure("running " + a.artifact + " failed: " + first_line(e.what()));
  }
  const double first_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  at::Tensor x0 = out.at(0).contiguous();

  // wall-clock time of the first image, so that a parent can measure process start to
  // first image (its clock and ours are the same system clock)
  const double first_unix =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();

  std::vector<double> ms;
  auto timed_call = [&]() {
    auto t0 = Clock::now();
    loader->run({x_T, labels});
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  };
  if (a.serve) {
    std::printf("ready\n");
    std::fflush(stdout);
    std::string line;
    while (std::getline(std::cin, line)) {
      timed_call();
      std::printf("ok %.4f\n", ms.back());
      std::fflush(stdout);
    }
  } else {
    for (int r = 0; r < a.runs; ++r) timed_call();
  }

  int width = 0, height = 0;
  std::vector<uint8_t> pixels = grid(x0, width, height);
  if (!flashcore_png::write(a.out, pixels.data(), width, height, static_cast<int>(c)))
    throw Failure("cannot write " + a.out);
  if (!a.raw.empty()) {
    std::ofstream f(a.raw, std::ios::binary);
    f.write(reinterpret_cast<const char*>(x0.data_ptr<float>()), x0.numel() * sizeof(float));
    if (!f) throw Failure("cannot write " + a.raw);
  }

  std::printf("%lld images (%lldx%lldx%lld), seed %llu -> %s\n", (long long)b, (long long)c, (long long)h,
              (long long)w, (unsigned long long)a.seed, a.out.c_str());
  std::printf("time to first image: %.1f ms (package load and first call)\n", first_ms);
  std::printf("first image at unix time: %.6f\n", first_unix);
  if (!ms.empty()) {
    std::sort(ms.begin(), ms.end());
    const double med = ms[ms.size() / 2];
    std::printf("per image: %.2f ms (median of %zu calls at batch %lld: %.2f ms a call)\n", med / b, ms.size(),
                (long long)b, med);
  }
  std::printf("peak RSS: %.0f MiB\n", peak_rss_mib());
  const std::string py = libpython_mapped();
  std::printf("libpython: %s\n", py.empty() ? "not loaded" : ("LOADED " + py).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const auto start = Clock::now();
  Args a;
  try {
    a = parse(argc, argv);
  } catch (const Usage& e) {
    std::fprintf(stderr, "usage: flashcore-run ARTIFACT.pt2 --labels L1,L2,... [--seed S] [--out grid.png] "
                         "[--runs N] [--threads N] [--raw x0.f32] [--serve]\nflashcore-run: error: %s\n", e.what());
    return 2;
  }
  try {
    return run(a, start);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "flashcore-run: error: %s\n", first_line(e.what()).c_str());
    return 1;
  }
}
