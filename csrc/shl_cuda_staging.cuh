// Staging of a row (or a window of it) in shared memory in segment order and its
// gradient's way back: 16-byte packs, the positives' bitmask, the cp.async ring.
// Part of csrc/shl_cuda.cu, included only there (its helpers live in the same
// anonymous namespace).
#pragma once
#include "shl_cuda_passes.cuh"

namespace shl {
namespace {

// Staging moves z and grad as raw bits (trivial types: the packs stay in registers).
template <int Bytes> struct BitsOf;
template <> struct BitsOf<2> { using type = uint16_t; };
template <> struct BitsOf<4> { using type = uint32_t; };
template <> struct BitsOf<8> { using type = uint64_t; };
template <class T>
using Bits = typename BitsOf<sizeof(T)>::type;

template <class T>
__host__ __device__ constexpr int64_t staged_z_bytes(int64_t C) {
  return (C * int64_t(sizeof(T)) + 15) / 16 * 16;
}

// The positives' bitmask: bit p % 32 of word p / 32 (words counted from the first position
// staged, rounded down to a word), in whole 16-byte groups of words (cleared 16 bytes at a
// time): room for C + 31 bits, C labels starting anywhere in a word.
__host__ __device__ constexpr int64_t staged_bits_bytes(int64_t C) {
  return (C + 31 + 127) / 128 * 16;
}

template <int NT>
__device__ __forceinline__ void clear_bits(uint32_t* bits, int C) {
  uint4* words = reinterpret_cast<uint4*>(bits);
  const int n = static_cast<int>(staged_bits_bytes(C) / 16);
  for (int q = threadIdx.x; q < n; q += NT) words[q] = make_uint4(0, 0, 0, 0);
}

// -inf as the raw bits of T (what staging writes for ignored labels and positives).
template <class T> struct NegInfBits;
template <> struct NegInfBits<float> { static constexpr uint32_t v = 0xff800000u; };
template <> struct NegInfBits<double> { static constexpr uint64_t v = 0xfff0000000000000ull; };
template <> struct NegInfBits<__half> { static constexpr uint16_t v = 0xfc00u; };
template <> struct NegInfBits<__nv_bfloat16> { static constexpr uint16_t v = 0xff80u; };

// Which positions a staging pass takes: all (a whole row; no test in the loops, which keep
// the registers they had) or those of a window [lo, lo + L).
struct AllPositions {
  static constexpr bool kAll = true;
  int lo = 0;
  __device__ __forceinline__ bool operator()(int) const { return true; }
};
struct WindowPositions {
  static constexpr bool kAll = false;
  int lo, L;
  __device__ __forceinline__ bool operator()(int p) const { return unsigned(p - lo) < unsigned(L); }
};

// The V elements at row column c0 (z bits, positive and ignored flags as V bytes, their
// positions) into zs in segment order: z for the negatives, -inf for ignored labels and
// positives, the positives also set in pos_bits. Packs without flags (nearly all) take the
// short path. `mapped`: xv holds the positions (else identity). Only the positions `keep`
// takes are staged (zs and pos_bits indexed by position, as in StagedRow).
template <int V, class T, class Flags, class Pos, class Keep>
__device__ __forceinline__ void scatter_pack(const Pack<V, Bits<T>>& zv, Flags pv, Flags iv,
                                             const Pack<V, Pos>& xv, bool mapped, int c0,
                                             const Keep& keep, Bits<T>* zs, uint32_t* pos_bits) {
  if ((pv | iv) == 0) {  // two loops: with the flag tests in it, the one loop took ~18
                         // instructions per element (SASS, bf16), this one ~5
#pragma unroll
    for (int t = 0; t < V; ++t) {
      const int p = mapped ? int(xv.v[t]) : c0 + t;
      if (keep(p)) zs[p] = zv.v[t];
    }
    return;
  }
#pragma unroll
  for (int t = 0; t < V; ++t) {
    const int p = mapped ? int(xv.v[t]) : c0 + t;
    if (!keep(p)) continue;
    const bool ign = (iv >> (8 * t)) & 0xff, pos = (pv >> (8 * t)) & 0xff;
    if (pos && !ign) atomicOr(pos_bits + (p >> 5), 1u << (p & 31));
    zs[p] = ign || pos ? Bits<T>(NegInfBits<T>::v) : zv.v[t];
  }
}

// A row as a head of h single elements (up to where z[base + h] starts 16 bytes: z itself is
// 16-byte aligned), n packs of V and a tail of fewer than V single elements, whatever C: the
// asynchronous staging and the unstaging take rows of any length 16 bytes at a time (the
// plain-load staging only rows of whole packs: with a head and tail it spilled registers).
// V = 1: no head, no tail. A pass visits the packs [first, end) (all but for windows of
// rows in identity order, see packs_for).
struct RowSplit {
  int h, n;
  int first, end;
};

template <int V>
__device__ __forceinline__ RowSplit row_split(int64_t base, int C) {
  const int h = static_cast<int>((V - base % V) % V);
  const int head = h < C ? h : C;
  const int n = (C - head) / V;
  return {head, n, 0, n};
}

// The packs of r a pass over the positions `keep` takes visits: every pack, except for a
// window of a row in identity order (`mapped` false: positions are columns), where only the
// packs meeting its columns [lo, lo + L) hold any (one read of the row for all windows).
__device__ __forceinline__ RowSplit packs_for(const RowSplit& r, const AllPositions&, int,
                                              bool) {
  return r;
}

__device__ __forceinline__ RowSplit packs_for(RowSplit r, const WindowPositions& k, int V,
                                              bool mapped) {
  if (mapped) return r;
  const int a = k.lo - r.h, b = k.lo + k.L - r.h;  // from the first pack's first column
  r.first = a <= 0 ? 0 : a / V;
  const int e = b <= 0 ? 0 : (b + V - 1) / V;
  r.end = e < r.n ? e : r.n;
  return r;
}

// The positions of the V columns from c (16-byte loads when c is a multiple of V).
template <int V, class Pos>
__device__ __forceinline__ Pack<V, Pos> load_positions(const Pos* position, int64_t c) {
  if (c % V == 0) return load_pack<V>(position + c);
  Pack<V, Pos> x;
#pragma unroll
  for (int t = 0; t < V; ++t) x.v[t] = position[c + t];
  return x;
}

// Column of the i-th element of the head and tail of a row split as r.
__device__ __forceinline__ int edge_column(const RowSplit& r, int V, int i) {
  return i < r.h ? i : r.h + r.n * V + (i - r.h);
}

// Stages the head and tail of the row (fewer than 2V elements) one element per thread.
template <int V, int NT, class T, class A, class Pos, class Keep>
__device__ __forceinline__ void stage_edges(const Params<T, A>& P, const Pos* position,
                                            int64_t base, int C, const RowSplit& r,
                                            const Keep& keep, Bits<T>* zs, uint32_t* pos_bits) {
  const Bits<T>* z = reinterpret_cast<const Bits<T>*>(P.z);
  for (int i = threadIdx.x; i < C - r.n * V; i += NT) {
    const int c = edge_column(r, V, i);
    Pack<1, Pos> xv;
    if (position) xv.v[0] = position[c];
    scatter_pack<1, T>(Pack<1, Bits<T>>{{z[base + c]}}, P.pos[base + c],
                       P.ign ? P.ign[base + c] : uint8_t(0), xv, position != nullptr, c, keep,
                       zs, pos_bits);
  }
}

template <int V, int NT, class T, class A, class Pos, class Keep>
__device__ __forceinline__ void unstage_edges(const Params<T, A>& P, const Pos* position,
                                              int64_t base, int C, const RowSplit& r,
                                              const Keep& keep, const Bits<T>* zs) {
  Bits<T>* grad = reinterpret_cast<Bits<T>*>(P.grad);
  for (int i = threadIdx.x; i < C - r.n * V; i += NT) {
    const int c = edge_column(r, V, i);
    const int p = position ? int(position[c]) : c;
    if (keep(p)) grad[base + c] = zs[p];
  }
}

// Reads the row (coalesced) and scatters the positions `keep` takes into zs in segment
// order (see scatter_pack; pos_bits cleared beforehand), C a multiple of V. Pos: the type of
// the position map (int32_t, or uint16_t for C <= 65536: half the reads); position null:
// identity.
template <int V, int NT, class T, class A, class Pos, class Keep>
__device__ __forceinline__ void stage_row(const Params<T, A>& P, const Pos* position,
                                          int64_t base, int C, const Keep& keep, T* zs_,
                                          uint32_t* pos_bits) {
  constexpr int kUnroll = V == 1 ? 3 : V == 2 ? 2 : 1;
  const RowSplit r = packs_for(RowSplit{0, C / V, 0, C / V}, keep, V, position != nullptr);
  const int n = r.end;
  const Bits<T>* z = reinterpret_cast<const Bits<T>*>(P.z);
  Bits<T>* zs = reinterpret_cast<Bits<T>*>(zs_);
  using Flags = typename UintOf<V>::type;  // a pack's V flag bytes as one integer
  for (int q0 = r.first + threadIdx.x; q0 < n; q0 += NT * kUnroll) {
    Pack<V, Bits<T>> zv[kUnroll];
    Flags pv[kUnroll], iv[kUnroll];
    Pack<V, Pos> xv[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t c = int64_t(q0 + j * NT) * V;
      if (q0 + j * NT < n) {
        zv[j] = load_pack<V>(z + base + c);
        pv[j] = load_flags<V>(P.pos + base + c);
        iv[j] = P.ign ? load_flags<V>(P.ign + base + c) : Flags(0);
        if (position) xv[j] = load_pack<V>(position + c);
      }
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int q = q0 + j * NT;
      if (q < n)
        scatter_pack<V, T>(zv[j], pv[j], iv[j], xv[j], position != nullptr, q * V, keep, zs,
                           pos_bits);
    }
  }
}

// Writes the gradient of the positions `keep` takes (in zs) to their columns of the row:
// whole packs where every element is kept (always, for a whole row), else element by
// element.
template <int V, int NT, class T, class A, class Pos, class Keep>
__device__ __forceinline__ void unstage_row(const Params<T, A>& P, const Pos* position,
                                            int64_t base, int C, const Keep& keep,
                                            const T* zs_) {
  constexpr int kUnroll = V == 1 ? 4 : V == 2 ? 2 : 1;
  const RowSplit r = packs_for(row_split<V>(base, C), keep, V, position != nullptr);
  const Bits<T>* zs = reinterpret_cast<const Bits<T>*>(zs_);
  Bits<T>* grad = reinterpret_cast<Bits<T>*>(P.grad);
  for (int q0 = r.first + threadIdx.x; q0 < r.end; q0 += NT * kUnroll) {
    Pack<V, Bits<T>> gv[kUnroll];
    unsigned in[kUnroll];  // bit t: element t is in the window
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int q = q0 + j * NT;
      in[j] = 0;
      if (q < r.end) {
        const int c = r.h + q * V;
        Pack<V, Pos> xv;
        if (position) xv = load_positions<V>(position, c);
#pragma unroll
        for (int t = 0; t < V; ++t) {
          const int p = position ? int(xv.v[t]) : c + t;
          const bool inside = keep(p);
          gv[j].v[t] = zs[inside ? p : keep.lo];
          in[j] |= unsigned(inside) << t;
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int q = q0 + j * NT;
      Bits<T>* g = grad + base + r.h + int64_t(q) * V;
      if constexpr (Keep::kAll) {
        if (q < r.end) store_pack(g, gv[j]);
      } else if (in[j] == (1u << V) - 1) {
        store_pack(g, gv[j]);
      } else if (in[j]) {
#pragma unroll
        for (int t = 0; t < V; ++t)
          if ((in[j] >> t) & 1) g[t] = gv[j].v[t];
      }
    }
  }
  if (V > 1) unstage_edges<V, NT>(P, position, base, C, r, keep, zs);
}

// Asynchronous staging (16-byte packs of 2- and 4-byte z): each thread copies its packs of
// the row (z and flags) into its own slots of a ring in shared memory with cp.async, kRing
// packs ahead of the one it scatters, so that more of the row is in flight than registers
// would hold; the first kRing packs of a block's next row are copied while the current row
// computes. The thread reads only its own slots: no barrier. Positions, the head and the
// tail are plain loads.
constexpr int kRing = 2;

template <int V, int NT, class T>
struct Ring {
  using Flags = typename UintOf<V>::type;
  Pack<V, Bits<T>> z[kRing][NT];
  Flags pos[kRing][NT], ign[kRing][NT];
};

template <int V, class T>
__host__ __device__ constexpr bool async_staging_ok() { return V >= 4 && sizeof(T) <= 4; }  // cp.async: >= 4 B

// Copies pack j (the thread's j-th: q = r.first + threadIdx.x + j NT) of the row at `base`,
// split as r, into ring slot j % kRing (nothing past the pass's packs); the caller commits.
template <int V, int NT, class T, class A>
__device__ __forceinline__ void ring_copy(const Params<T, A>& P, int64_t base,
                                          const RowSplit& r, int j, Ring<V, NT, T>* ring) {
  const int q = r.first + threadIdx.x + j * NT;
  if (q >= r.end) return;
  const int slot = j % kRing;
  const int64_t c = base + r.h + int64_t(q) * V;
  async_copy<16>(&ring->z[slot][threadIdx.x], reinterpret_cast<const Bits<T>*>(P.z) + c);
  async_copy<V>(&ring->pos[slot][threadIdx.x], P.pos + c);
  if (P.ign) async_copy<V>(&ring->ign[slot][threadIdx.x], P.ign + c);
}

// The first kRing packs of a pass over the row at `base` taking the positions `keep` takes
// (the copies stage_row_async would start with).
template <int V, int NT, class T, class A, class Keep>
__device__ __forceinline__ void ring_prefetch(const Params<T, A>& P, int64_t base, int C,
                                              const Keep& keep, bool mapped,
                                              Ring<V, NT, T>* ring) {
  const RowSplit r = packs_for(row_split<V>(base, C), keep, V, mapped);
#pragma unroll
  for (int j = 0; j < kRing; ++j) {
    ring_copy<V, NT>(P, base, r, j, ring);
    async_commit();
  }
}

// stage_row through the ring; `prefetched`: ring_prefetch already copied the first packs.
template <int V, int NT, class T, class A, class Pos, class Keep>
__device__ __forceinline__ void stage_row_async(const Params<T, A>& P, const Pos* position,
                                                int64_t base, int C, const Keep& keep, T* zs_,
                                                uint32_t* pos_bits, Ring<V, NT, T>* ring,
                                                bool prefetched) {
  const RowSplit r = packs_for(row_split<V>(base, C), keep, V, position != nullptr);
  Bits<T>* zs = reinterpret_cast<Bits<T>*>(zs_);
  if (!prefetched) ring_prefetch<V, NT>(P, base, C, keep, position != nullptr, ring);
  for (int j = 0, q = r.first + threadIdx.x; q < r.end; ++j, q += NT) {
    const int c = r.h + q * V;
    Pack<V, Pos> xv;
    if (position) xv = load_positions<V>(position, c);
    async_wait<kRing - 1>();  // pack j is in (one group committed per pack)
    const int slot = j % kRing;
    const Pack<V, Bits<T>> zv = ring->z[slot][threadIdx.x];
    const auto pv = ring->pos[slot][threadIdx.x];
    const auto iv = P.ign ? ring->ign[slot][threadIdx.x] : decltype(pv)(0);
    scatter_pack<V, T>(zv, pv, iv, xv, position != nullptr, c, keep, zs, pos_bits);
    ring_copy<V, NT>(P, base, r, j + kRing, ring);  // into the slot just read
    async_commit();
  }
  async_wait<0>();  // (only empty groups can be left)
  stage_edges<V, NT>(P, position, base, C, r, keep, zs, pos_bits);
}

// Stages the positions `keep` takes of the row at `base` (zs, pos_bits indexed by position):
// through the ring when there is one, else with plain loads.
template <int V, int NT, class T, class A, class Keep>
__device__ __forceinline__ void stage(const Params<T, A>& P, int64_t base, const Keep& keep,
                                      T* zs, uint32_t* pos_bits, Ring<V, NT, T>* ring,
                                      bool prefetched) {
  const int C = static_cast<int>(P.C);
  if constexpr (async_staging_ok<V, T>()) {
    if (ring) {
      if (P.position16)
        stage_row_async<V, NT>(P, P.position16, base, C, keep, zs, pos_bits, ring, prefetched);
      else
        stage_row_async<V, NT>(P, P.position, base, C, keep, zs, pos_bits, ring, prefetched);
      return;
    }
  }
  if (P.position16) stage_row<V, NT>(P, P.position16, base, C, keep, zs, pos_bits);
  else stage_row<V, NT>(P, P.position, base, C, keep, zs, pos_bits);
}

template <int V, int NT, class T, class A, class Keep>
__device__ __forceinline__ void unstage(const Params<T, A>& P, int64_t base, const Keep& keep,
                                        const T* zs) {
  const int C = static_cast<int>(P.C);
  if (P.position16) unstage_row<V, NT>(P, P.position16, base, C, keep, zs);
  else unstage_row<V, NT>(P, P.position, base, C, keep, zs);
}

}  // namespace
}  // namespace shl
