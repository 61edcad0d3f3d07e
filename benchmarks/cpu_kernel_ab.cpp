// Side-by-side timing of the CPU SHL kernel (csrc/shl_cpu.cpp) against another version of
// it, compiled into the same program (namespace shl_base), calls interleaved: see
// cpu_kernel_ab.sh. Prints the median ms of each and the ratio per segmentation.
// Argument: OpenMP threads (default 1).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "shl_args.h"

namespace shl {
const char* shl_fused_cpu(const ShlArgs& a);
}
extern "C" const char* base_shl_fused_cpu(const void* args);  // the same ShlArgs layout

namespace {

// m segments of C positions: "equal" sizes, "dirichlet" (Dirichlet(0.5) shares, as
// bench_loss.py) or "zipf" (segment k ~ 1 / (k + 1)); each at least one label.
std::vector<int64_t> offsets(const char* kind, int m, int64_t C, std::mt19937& g) {
  std::vector<double> share(m, 1.0);
  std::gamma_distribution<double> gamma(0.5, 1.0);
  for (int k = 0; k < m; ++k) {
    if (kind[0] == 'd') share[k] = gamma(g);
    if (kind[0] == 'z') share[k] = 1.0 / (k + 1);
  }
  double total = 0;
  for (double s : share) total += s;
  std::vector<int64_t> off(m + 1, 0);
  for (int k = 0; k < m; ++k)
    off[k + 1] = off[k] + 1 + static_cast<int64_t>(share[k] / total * (C - m));
  off[m] = C;  // the rounding remainder goes to the last segment
  return off;
}

double median_ms(std::vector<double> t) {
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  const int64_t B = 512, C = 8192;
  const int repeats = 15, warmup = 3;
  std::mt19937 g(0);
  std::normal_distribution<float> normal(0.f, 3.f);
  std::uniform_real_distribution<float> uniform(0.f, 1.f);
  std::vector<float> z(B * C), grad(B * C), loss(B);
  std::vector<uint8_t> pos(B * C);
  for (float& v : z) v = normal(g);
  for (uint8_t& p : pos) p = uniform(g) < 0.002f;  // ~16 positives per row
  std::printf("B=%lld C=%lld fp32, %d thread(s), median of %d after %d warm-up calls\n",
              (long long)B, (long long)C, threads, repeats, warmup);
  std::printf("%-10s %6s %6s %10s %10s %8s\n", "sizes", "m", "order", "new ms", "base ms",
              "base/new");
  const struct { const char* kind; int m; } cases[] = {
      {"equal", 1},      {"equal", 64},     {"equal", 512},    {"equal", 2048},
      {"equal", 8192},   {"dirichlet", 64}, {"dirichlet", 199}, {"dirichlet", 1000},
      {"zipf", 64},      {"zipf", 333},     {"zipf", 1000}};
  for (const auto& cs : cases) {
    std::vector<int64_t> off = offsets(cs.kind, cs.m, C, g), order(C);
    for (int64_t c = 0; c < C; ++c) order[c] = c;
    std::shuffle(order.begin(), order.end(), g);
    std::vector<float> eta(cs.m, 0.f), geta(B * cs.m);
    for (int shuffled = 0; shuffled < 2; ++shuffled) {
      shl::ShlArgs a;
      a.z = z.data();
      a.B = B, a.C = C, a.m = cs.m;
      a.pos = pos.data();
      a.order = shuffled ? order.data() : nullptr;
      a.offsets = off.data();
      a.eta = eta.data();
      a.grad_scale = 1.0 / B;
      a.loss = loss.data(), a.grad = grad.data(), a.grad_eta = geta.data();
      a.num_threads = threads;
      std::vector<double> tn, tb;
      for (int r = 0; r < warmup + repeats; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        const char* e1 = shl::shl_fused_cpu(a);
        const auto t1 = std::chrono::steady_clock::now();
        const char* e2 = base_shl_fused_cpu(&a);
        const auto t2 = std::chrono::steady_clock::now();
        if (e1 || e2) {
          std::printf("kernel error: %s\n", e1 ? e1 : e2);
          return 1;
        }
        if (r < warmup) continue;
        tn.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
        tb.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count());
      }
      const double n = median_ms(tn), b = median_ms(tb);
      std::printf("%-10s %6d %6s %10.2f %10.2f %7.2fx\n", cs.kind, cs.m,
                  shuffled ? "shuf" : "ident", n, b, b / n);
    }
  }
  return 0;
}
