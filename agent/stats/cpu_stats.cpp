// gradwatch's fused statistics kernel for tensors in host memory: one read of each tensor for every
// statistic of a summary row (agent/stats/summarize.py). The plain-torch path needs about a dozen passes and as
// many temporaries per tensor; this is the CPU twin of the Triton kernel (agent/stats/triton_stats.py).
//
// Row layout (checked from Python against gradwatch.agent.stats.layout at load):
//   nan, inf, zero, sum, sum of squares, min, max, sum of cubes, checksum low, checksum high, histogram[64]
// Sums in float64 over finite values; the histogram counts finite non-zero values by floor(log2|x|),
// read from the IEEE exponent bits, denormals in the underflow bucket 0. The checksum is the wrapping
// 64-bit sum of every element's bits read as a signed integer of its width (uint64 adds: defined wrap),
// kept as two exact float64 halves: low in [0, 2^32), high in [-2^31, 2^31).
//
// Plain pybind11 (no torch headers, so the build takes seconds): Python passes data pointers, element
// counts and dtype codes, and the output row buffer's address. One thread, the GIL released. No OpenMP:
// torch's wheel bundles its own libgomp, and a second runtime in the process oversubscribes the cores.
// Each element is read once; lanes of independent accumulators keep the adds and histogram increments
// from waiting on each other (about 2 ns an element on a 2-core Xeon VM, ~6x torch's dozen passes).

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int kColNan = 0, kColInf = 1, kColZero = 2, kColSum = 3, kColSumSq = 4, kColMin = 5, kColMax = 6,
              kColCube = 7, kColCheckLo = 8, kColCheckHi = 9, kColHist = 10;
constexpr int kHistBuckets = 64;
constexpr int kHistMinExponent = -40;
constexpr int kCols = kColHist + kHistBuckets;
constexpr int kLanes = 4;            // independent accumulators: breaks the add and histogram dependency chains
constexpr double kInf = std::numeric_limits<double>::infinity();

enum Dtype { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

struct Partial {
  int64_t nan = 0, zero = 0;
  uint64_t checksum = 0;  // wraps modulo 2^64
  double sum = 0, sumsq = 0, cube = 0, min = kInf, max = -kInf;  // min/max of nothing: the empty fold
  std::vector<int64_t> counts;  // per biased exponent; the top one holds NaN and Inf

  void merge(const Partial& p) {
    nan += p.nan;
    zero += p.zero;
    checksum += p.checksum;
    sum += p.sum;
    sumsq += p.sumsq;
    cube += p.cube;
    min = std::min(min, p.min);
    max = std::max(max, p.max);
    counts.resize(std::max(counts.size(), p.counts.size()), 0);
    for (size_t e = 0; e < p.counts.size(); ++e) counts[e] += p.counts[e];
  }
};

inline float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {  // zero or a half denormal: exact in float32 (as torch's .float() makes it)
    float v = std::ldexp(float(man), -24);
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Exponent width and mantissa extraction for the formats read bit-wise; half is widened to float32 first.
template <typename Bits, int Shift, uint32_t Mask>
struct Format {
  using bits_t = Bits;
  static constexpr int shift = Shift;
  static constexpr uint32_t mask = Mask;
};
using F32 = Format<uint32_t, 23, 0xFF>;
using F64 = Format<uint64_t, 52, 0x7FF>;

// Check: whether the scan sums the bits it reads into the checksum; not for widened 16-bit blocks, whose
// checksum is of their original 16 bits (scan_tensor).
template <typename Fmt, bool Cubes, bool Check = true>
void scan(const typename Fmt::bits_t* bits, int64_t n, Partial& out) {
  using B = typename Fmt::bits_t;
  using V = std::conditional_t<sizeof(B) == 8, double, float>;
  constexpr B kMagnitude = ~(B(1) << (sizeof(B) * 8 - 1));
  constexpr B kMantissa = (B(1) << Fmt::shift) - 1;
  constexpr int bins = Fmt::mask + 1;
  std::vector<int64_t> lanes(size_t(bins) * kLanes, 0);
  // Independent accumulators per lane: consecutive elements never wait on each other's add or histogram
  // increment. Lanes fold in a fixed order, so results are deterministic.
  int64_t nan[kLanes] = {0}, zero[kLanes] = {0};
  uint64_t check = 0;  // one accumulator: an integer add waits on nothing slow (lanes of it measured slower)
  double sum[kLanes] = {0}, sumsq[kLanes] = {0}, cube[kLanes] = {0};
  V lo[kLanes], hi[kLanes];
  std::fill(lo, lo + kLanes, std::numeric_limits<V>::infinity());
  std::fill(hi, hi + kLanes, -std::numeric_limits<V>::infinity());
  auto step = [&](int l, B b) {
    uint32_t e = uint32_t(b >> Fmt::shift) & Fmt::mask;
    lanes[size_t(l) * bins + e]++;
    bool finite = e != Fmt::mask;
    nan[l] += !finite && (b & kMantissa) != 0;
    zero[l] += (b & kMagnitude) == 0;
    if constexpr (Check) check += uint64_t(int64_t(std::make_signed_t<B>(b)));  // sign-extended
    V v;
    std::memcpy(&v, &b, sizeof(V));
    double d = finite ? double(v) : 0.0;  // non-finite values are counted, never summed
    sum[l] += d;
    sumsq[l] += d * d;
    if constexpr (Cubes) cube[l] += d * d * d;
    lo[l] = std::min(lo[l], finite ? v : std::numeric_limits<V>::infinity());
    hi[l] = std::max(hi[l], finite ? v : -std::numeric_limits<V>::infinity());
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) step(l, bits[i + l]);
  for (; i < n; ++i) step(0, bits[i]);
  Partial part;
  part.checksum = check;
  part.counts.assign(bins, 0);
  for (int l = 0; l < kLanes; ++l) {
    part.nan += nan[l];
    part.zero += zero[l];
    part.sum += sum[l];
    part.sumsq += sumsq[l];
    part.cube += cube[l];
    part.min = std::min(part.min, double(lo[l]));
    part.max = std::max(part.max, double(hi[l]));
    for (int e = 0; e < bins; ++e) part.counts[e] += lanes[size_t(l) * bins + e];
  }
  out.merge(part);
}

// The 16-bit formats are widened to float32 bits a block at a time (bf16: a shift; half: a conversion,
// as torch's .float() does), so every format runs through the scans above.
void scan_tensor(const void* data, int64_t n, int dtype, bool cubes, Partial& out) {
  if (dtype == kFloat64) {
    auto p = static_cast<const uint64_t*>(data);
    return cubes ? scan<F64, true>(p, n, out) : scan<F64, false>(p, n, out);
  }
  if (dtype == kFloat32) {
    auto p = static_cast<const uint32_t*>(data);
    return cubes ? scan<F32, true>(p, n, out) : scan<F32, false>(p, n, out);
  }
  auto p = static_cast<const uint16_t*>(data);
  constexpr int64_t kBlock = 1 << 14;
  std::vector<uint32_t> wide(std::min(n, kBlock));
  for (int64_t off = 0; off < n; off += kBlock) {
    int64_t len = std::min(kBlock, n - off);
    uint64_t check = 0;
    for (int64_t i = 0; i < len; ++i) {
      check += uint64_t(int64_t(int16_t(p[off + i])));  // the 16-bit pattern, sign-extended
      if (dtype == kBFloat16) {
        wide[i] = uint32_t(p[off + i]) << 16;
      } else {
        float f = half_to_float(p[off + i]);
        std::memcpy(&wide[i], &f, 4);
      }
    }
    Partial part;
    cubes ? scan<F32, true, false>(wide.data(), len, part) : scan<F32, false, false>(wide.data(), len, part);
    part.checksum = check;
    out.merge(part);
  }
}

// Write a tensor's statistics into its row, or fold them into what is there (`accumulate`).
void write_row(double* row, const Partial& total, bool histogram, bool accumulate) {
  // Widened 16-bit formats carry float32 exponents, which are their true exponents (a bf16 denormal keeps
  // exponent 0; a half denormal becomes a float32 normal), as torch's path reads them.
  const int mask = int(total.counts.size()) - 1, bias = mask / 2;
  const int64_t high = int64_t(total.checksum) >> 32;  // arithmetic shift: the signed high half
  double values[kCols] = {double(total.nan), double(total.counts[mask] - total.nan), double(total.zero),
                          total.sum, total.sumsq, total.min, total.max, total.cube,
                          double(total.checksum & 0xFFFFFFFFu), double(high)};
  if (histogram) {
    values[kColHist] = double(total.counts[0] - total.zero);  // denormals: the underflow bucket
    for (int e = 1; e < mask; ++e)
      values[kColHist + std::clamp(e - bias - kHistMinExponent, 0, kHistBuckets - 1)] += double(total.counts[e]);
  }
  for (int c = 0; c < kCols; ++c) {
    if (!accumulate) row[c] = values[c];
    else if (c == kColMin) row[c] = std::min(row[c], values[c]);
    else if (c == kColMax) row[c] = std::max(row[c], values[c]);
    else row[c] += values[c];
  }
}

// Statistics of tensor i (address, element count, dtype code) into row rows[i] of the float64 buffer at
// `buffer` (kCols per row). The caller holds the tensors and the buffer for the whole call.
void summarize_many(int64_t buffer, const std::vector<int64_t>& rows, const std::vector<int64_t>& addrs,
                    const std::vector<int64_t>& numels, const std::vector<int>& dtypes, bool histogram,
                    bool accumulate, bool cubes) {
  const size_t n = rows.size();
  if (addrs.size() != n || numels.size() != n || dtypes.size() != n)
    throw std::invalid_argument("rows, addrs, numels and dtypes must have the same length");
  for (int dtype : dtypes)
    if (dtype < kFloat32 || dtype > kFloat16) throw std::invalid_argument("unknown dtype code");
  py::gil_scoped_release release;  // the exporter's thread encodes the previous report meanwhile
  double* out = reinterpret_cast<double*>(buffer);
  for (size_t t = 0; t < n; ++t) {
    Partial total;
    total.counts.assign(dtypes[t] == kFloat64 ? F64::mask + 1 : F32::mask + 1, 0);
    if (numels[t] > 0) scan_tensor(reinterpret_cast<const void*>(addrs[t]), numels[t], dtypes[t], cubes, total);
    write_row(out + rows[t] * kCols, total, histogram, accumulate);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gradwatch fused CPU statistics kernel (agent/stats/cpu_stats.cpp)";
  m.def("summarize_many", &summarize_many, py::arg("buffer"), py::arg("rows"), py::arg("addrs"),
        py::arg("numels"), py::arg("dtypes"), py::arg("histogram"), py::arg("accumulate"), py::arg("cubes"));
  m.def("layout", [] { return py::make_tuple(kColCheckLo, kColCheckHi, kColHist, kHistBuckets, kHistMinExponent); });
}
