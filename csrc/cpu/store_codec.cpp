// Store record payloads. One payload holds the T tokens of one sequence:
//
//   byte 0         flags: bit 0 = some token has padding (fewer than k valid targets)
//   bit stream     (LSB first), token after token, no alignment between tokens:
//     [n]            valid targets of the token, bit_width(k) bits, only when flag bit 0
//     fp16 / bf16:   n ids at id_bits(V) bits each, then n values at 16 bits each,
//                    in the order given (exact round trip of the ids, values rounded to
//                    nearest even).
//     compact:       ids sorted ascending and coded as gaps (g_0 = id_0,
//                    g_j = id_j - id_{j-1} - 1) with a Rice code whose parameter (5 bits)
//                    is chosen per token: about log2(V / n) + 1.5 bits per id. Then
//                    h = min(head, n) and, when h < n, the positions (in id order) of the
//                    h largest values as Rice-coded gaps (parameter: 3 bits). Then two value
//                    classes, the head values then the others, each in id order:
//                      mode (2 bits): 0 all finite, 1 finite and -inf, 2 all -inf,
//                                     3 raw float32 (ranges too wide to quantise)
//                      hi, lo (bf16 bits, rounded outwards), bits b (5 bits)
//                      codes, b bits each: value = lo + c * (hi - lo) / (levels - 1),
//                      levels = 2^b (mode 1: code 0 is -inf and levels = 2^b - 1).
//                    b is the fewest bits (at least head_min_bits for the head, when its
//                    values differ) whose decoded values are all within the class's
//                    tolerance: the error bound holds by construction, per token.
#include "store_codec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "distill_ops/kd_math.h"

namespace distill_ops::store {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int bit_width(uint64_t x) { return x == 0 ? 0 : 64 - __builtin_clzll(x); }

uint64_t low_mask(int bits) { return bits >= 64 ? ~0ull : ((1ull << bits) - 1); }

class BitWriter {
 public:
  explicit BitWriter(std::vector<uint8_t>& out) : out_(out) {}

  void put(uint64_t v, int bits) {  // bits <= 56
    if (bits == 0) return;
    acc_ |= (v & low_mask(bits)) << used_;
    used_ += bits;
    while (used_ >= 8) {
      out_.push_back(uint8_t(acc_));
      acc_ >>= 8;
      used_ -= 8;
    }
  }

  // q zeros, then a one.
  void unary(uint64_t q) {
    while (q >= 48) {
      put(0, 48);
      q -= 48;
    }
    put(1ull << q, int(q) + 1);
  }

  void rice(uint64_t g, int b) {
    unary(g >> b);
    put(g, b);
  }

  void flush() {
    if (used_ > 0) out_.push_back(uint8_t(acc_));
    acc_ = 0;
    used_ = 0;
  }

 private:
  std::vector<uint8_t>& out_;
  uint64_t acc_ = 0;
  int used_ = 0;
};

class BitReader {
 public:
  BitReader(const uint8_t* data, int64_t nbytes)
      : data_(data), nbytes_(nbytes), limit_(uint64_t(nbytes) * 8) {}

  // The next >= 57 bits (zeros past the end).
  uint64_t peek() const {
    const uint64_t byte = pos_ >> 3;
    uint64_t w = 0;
    if (byte + 8 <= uint64_t(nbytes_)) {
      std::memcpy(&w, data_ + byte, 8);
    } else {
      for (uint64_t i = 0; byte + i < uint64_t(nbytes_) && i < 8; ++i)
        w |= uint64_t(data_[byte + i]) << (8 * i);
    }
    return w >> (pos_ & 7);
  }

  uint64_t get(int bits) {  // bits <= 32
    const uint64_t v = peek() & low_mask(bits);
    pos_ += bits;
    return v;
  }

  // Counts zeros up to the next one; false when the run leaves the payload.
  bool unary(uint64_t& q) {
    q = 0;
    for (;;) {
      const uint64_t w = peek() & low_mask(57);
      if (w != 0) {
        const int z = __builtin_ctzll(w);
        q += z;
        pos_ += z + 1;
        return pos_ <= limit_;
      }
      q += 57;
      pos_ += 57;
      if (pos_ > limit_) return false;
    }
  }

  bool ok() const { return pos_ <= limit_; }

 private:
  const uint8_t* data_;
  int64_t nbytes_;
  uint64_t limit_;
  uint64_t pos_ = 8;  // after the flags byte
};

// bf16 bits of the smallest bf16 >= f (up) or the largest bf16 <= f (down), f finite.
uint16_t bf16_outward(float f, bool up) {
  const uint16_t h = float_to_bf16(f);
  const float back = bf16_to_float(h);
  if (back == f || (up ? back > f : back < f)) return h;
  // One ulp further in the needed direction (sign-magnitude: away from zero grows |x|).
  const bool grow = (f < 0.0f) != up;
  if (f == 0.0f) return up ? 0x0001 : 0x8001;
  return uint16_t(grow ? h + 1 : h - 1);
}

struct Quantiser {
  int mode = 0;  // 0 finite, 1 finite and -inf, 2 all -inf, 3 raw float32
  float lo = 0.0f, hi = 0.0f;
  int bits = 0;
  double step = 0.0;

  int reserve() const { return mode == 1 ? 1 : 0; }

  void set_bits(int b) {
    bits = b;
    const int64_t levels = (int64_t(1) << b) - reserve();
    step = levels > 1 ? (double(hi) - double(lo)) / double(levels - 1) : 0.0;
  }

  uint32_t code(float v) const {
    if (v == kNegInf) return 0;
    const int64_t levels = (int64_t(1) << bits) - reserve();
    double c = step > 0.0 ? std::nearbyint((double(v) - double(lo)) / step) : 0.0;
    c = std::min(std::max(c, 0.0), double(levels - 1));
    return uint32_t(c) + uint32_t(reserve());
  }

  float value(uint32_t c) const {
    if (mode == 1 && c == 0) return kNegInf;
    return float(double(lo) + double(c - uint32_t(reserve())) * step);
  }
};

// Chooses and writes a class's quantiser and codes; returns the max |error|.
double encode_class(BitWriter& w, const float* v, int64_t n, double tol, int min_bits) {
  if (n == 0) return 0.0;
  float fmin = std::numeric_limits<float>::infinity(), fmax = -fmin;
  bool ninf = false;
  for (int64_t i = 0; i < n; ++i) {
    if (v[i] == kNegInf) {
      ninf = true;
    } else {
      fmin = std::min(fmin, v[i]);
      fmax = std::max(fmax, v[i]);
    }
  }
  Quantiser q;
  const bool finite = fmin <= fmax;
  q.mode = !finite ? 2 : (ninf ? 1 : 0);
  double err = 0.0;
  if (q.mode != 2) {
    q.lo = bf16_to_float(bf16_outward(fmin, false));
    q.hi = bf16_to_float(bf16_outward(fmax, true));
    bool fits = std::isfinite(q.lo) && std::isfinite(q.hi);
    int b = q.hi > q.lo ? std::max(min_bits, 1) : 0;
    if (q.mode == 1) b = std::max(b, 1);
    // Start from the bound's estimate, then check the decoded values themselves.
    if (fits && q.hi > q.lo) {
      const double need = (double(q.hi) - double(q.lo)) / (2.0 * tol) + 1.0 + q.reserve();
      b = std::max(b, bit_width(uint64_t(std::min(need, 1e12)) - 1));
    }
    for (;; ++b) {
      if (!fits || b > 24) {
        q.mode = 3;
        break;
      }
      q.set_bits(b);
      err = 0.0;
      for (int64_t i = 0; i < n; ++i)
        if (v[i] != kNegInf) err = std::max(err, std::fabs(double(q.value(q.code(v[i]))) - v[i]));
      if (err <= tol) break;
    }
  }
  w.put(uint64_t(q.mode), 2);
  if (q.mode == 2) return 0.0;
  if (q.mode == 3) {
    for (int64_t i = 0; i < n; ++i) w.put(float_to_bits(v[i]), 32);
    return 0.0;
  }
  w.put(float_to_bits(q.hi) >> 16, 16);
  w.put(float_to_bits(q.lo) >> 16, 16);
  w.put(uint64_t(q.bits), 5);
  for (int64_t i = 0; i < n; ++i) w.put(q.code(v[i]), q.bits);
  return err;
}

bool decode_class(BitReader& r, float* out, const int32_t* slot, int64_t n) {
  if (n == 0) return true;
  Quantiser q;
  q.mode = int(r.get(2));
  if (q.mode == 2) {
    for (int64_t i = 0; i < n; ++i) out[slot[i]] = kNegInf;
    return r.ok();
  }
  if (q.mode == 3) {
    for (int64_t i = 0; i < n; ++i) out[slot[i]] = bits_to_float(uint32_t(r.get(32)));
    return r.ok();
  }
  q.hi = bf16_to_float(uint16_t(r.get(16)));
  q.lo = bf16_to_float(uint16_t(r.get(16)));
  const int b = int(r.get(5));
  if (b > 24 || (q.mode == 1 && b == 0)) return false;
  q.set_bits(b);
  for (int64_t i = 0; i < n; ++i) out[slot[i]] = q.value(uint32_t(r.get(b)));
  return r.ok();
}

// Rice parameter in [0, max_b] minimising the coded length of the gaps.
int best_rice(const uint32_t* g, int64_t n, int max_b) {
  int best = 0;
  uint64_t best_cost = ~0ull;
  for (int b = 0; b <= max_b; ++b) {
    uint64_t cost = uint64_t(n) * uint64_t(b + 1);
    for (int64_t i = 0; i < n; ++i) cost += g[i] >> b;
    if (cost < best_cost) {
      best_cost = cost;
      best = b;
    }
  }
  return best;
}

int64_t valid_count(const int32_t* row, int64_t k) {
  int64_t n = 0;
  while (n < k && row[n] >= 0) ++n;
  return n;
}

}  // namespace

int id_bits(int64_t vocab) { return std::max(1, bit_width(uint64_t(std::max<int64_t>(vocab, 1) - 1))); }

EncodeStats encode(const int32_t* ids, const float* lp, int64_t T, const CodecParams& p,
                   std::vector<uint8_t>& out) {
  EncodeStats st;
  const int64_t k = p.k;
  bool pad = false;
  for (int64_t t = 0; t < T && !pad; ++t) pad = valid_count(ids + t * k, k) < k;
  out.push_back(uint8_t(pad ? 1 : 0));
  BitWriter w(out);
  const int kb = bit_width(uint64_t(k));
  const int ib = id_bits(p.vocab);
  std::vector<int32_t> order(k), sid(k), hslot(k), tslot(k);
  std::vector<float> sv(k), hv(k), tv(k);
  std::vector<uint32_t> gaps(k);
  std::vector<uint8_t> is_head(k);
  for (int64_t t = 0; t < T; ++t) {
    const int32_t* row_id = ids + t * k;
    const float* row_lp = lp + t * k;
    const int64_t n = valid_count(row_id, k);
    if (pad) w.put(uint64_t(n), kb);
    if (n == 0) continue;
    if (p.encoding != int(ValueEncoding::Compact)) {
      const bool half = p.encoding == int(ValueEncoding::F16);
      for (int64_t j = 0; j < n; ++j) w.put(uint64_t(row_id[j]), ib);
      for (int64_t j = 0; j < n; ++j) {
        const uint16_t h = half ? float_to_half(row_lp[j]) : float_to_bf16(row_lp[j]);
        w.put(h, 16);
        const float back = half ? half_to_float(h) : bf16_to_float(h);
        if (back != row_lp[j]) {  // -inf round-trips; a finite value's error is finite
          const double e = std::isfinite(back) ? std::fabs(double(back) - row_lp[j])
                                               : std::numeric_limits<double>::infinity();
          st.max_err_head = std::max(st.max_err_head, e);
        }
      }
      continue;
    }
    // Compact: sort by id, gap-code the ids.
    std::iota(order.begin(), order.begin() + n, 0);
    std::sort(order.begin(), order.begin() + n,
              [&](int32_t a, int32_t b) { return row_id[a] < row_id[b]; });
    for (int64_t j = 0; j < n; ++j) {
      sid[j] = row_id[order[j]];
      sv[j] = row_lp[order[j]];
      gaps[j] = uint32_t(j == 0 ? sid[0] : sid[j] - sid[j - 1] - 1);
    }
    const int rb = best_rice(gaps.data(), n, ib);
    w.put(uint64_t(rb), 5);
    for (int64_t j = 0; j < n; ++j) w.rice(gaps[j], rb);
    // The head: the h largest values (ties: lower id), as positions in id order.
    const int64_t h = std::min<int64_t>(p.head, n);
    std::iota(order.begin(), order.begin() + n, 0);
    std::partial_sort(order.begin(), order.begin() + h, order.begin() + n,
                      [&](int32_t a, int32_t b) { return sv[a] > sv[b] || (sv[a] == sv[b] && a < b); });
    std::fill(is_head.begin(), is_head.begin() + n, 0);
    for (int64_t j = 0; j < h; ++j) is_head[order[j]] = 1;
    int64_t nh = 0, nt = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (is_head[j]) {
        gaps[nh] = uint32_t(j - (nh == 0 ? 0 : hslot[nh - 1] + 1));
        hslot[nh] = int32_t(j);
        hv[nh++] = sv[j];
      } else {
        tv[nt++] = sv[j];
      }
    }
    if (h < n) {
      const int pb = best_rice(gaps.data(), h, 7);
      w.put(uint64_t(pb), 3);
      for (int64_t j = 0; j < h; ++j) w.rice(gaps[j], pb);
    }
    st.max_err_head = std::max(st.max_err_head,
                               encode_class(w, hv.data(), h, p.head_tol, p.head_min_bits));
    st.max_err_tail = std::max(st.max_err_tail, encode_class(w, tv.data(), nt, p.tail_tol, 0));
  }
  w.flush();
  if (p.encoding != int(ValueEncoding::Compact)) st.max_err_tail = st.max_err_head;
  return st;
}

bool decode(const uint8_t* data, int64_t nbytes, int64_t T, const CodecParams& p, int32_t* ids,
            float* lp) {
  if (nbytes < 1 || (data[0] & ~1u) != 0) return false;
  const bool pad = data[0] & 1u;
  const int64_t k = p.k;
  const int kb = bit_width(uint64_t(k));
  const int ib = id_bits(p.vocab);
  BitReader r(data, nbytes);
  std::vector<int32_t> hslot(k), tslot(k);
  std::vector<uint8_t> is_head(k);
  for (int64_t t = 0; t < T; ++t) {
    int32_t* row_id = ids + t * k;
    float* row_lp = lp + t * k;
    const int64_t n = pad ? int64_t(r.get(kb)) : k;
    if (n > k) return false;
    for (int64_t j = n; j < k; ++j) {
      row_id[j] = -1;
      row_lp[j] = kNegInf;
    }
    if (n == 0) continue;
    if (p.encoding != int(ValueEncoding::Compact)) {
      const bool half = p.encoding == int(ValueEncoding::F16);
      for (int64_t j = 0; j < n; ++j) {
        const uint64_t id = r.get(ib);
        if (id >= uint64_t(p.vocab)) return false;
        row_id[j] = int32_t(id);
      }
      for (int64_t j = 0; j < n; ++j) {
        const uint16_t h = uint16_t(r.get(16));
        row_lp[j] = half ? half_to_float(h) : bf16_to_float(h);
      }
      if (!r.ok()) return false;
      continue;
    }
    const int rb = int(r.get(5));
    if (rb > ib) return false;
    int64_t prev = -1;
    for (int64_t j = 0; j < n; ++j) {
      uint64_t q;
      if (!r.unary(q) || q > uint64_t(p.vocab)) return false;
      prev += int64_t((q << rb) | r.get(rb)) + 1;
      if (prev >= p.vocab) return false;
      row_id[j] = int32_t(prev);
    }
    const int64_t h = std::min<int64_t>(p.head, n);
    std::fill(is_head.begin(), is_head.begin() + n, 0);
    if (h < n) {
      const int pb = int(r.get(3));
      int64_t pos = -1;
      for (int64_t j = 0; j < h; ++j) {
        uint64_t q;
        if (!r.unary(q) || q > uint64_t(k)) return false;
        pos += int64_t((q << pb) | r.get(pb)) + 1;
        if (pos >= n) return false;
        is_head[pos] = 1;
      }
    } else {
      std::fill(is_head.begin(), is_head.begin() + n, 1);
    }
    int64_t nh = 0, nt = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (is_head[j]) hslot[nh++] = int32_t(j);
      else tslot[nt++] = int32_t(j);
    }
    if (nh != h) return false;
    if (!decode_class(r, row_lp, hslot.data(), nh)) return false;
    if (!decode_class(r, row_lp, tslot.data(), nt)) return false;
  }
  return r.ok();
}

}  // namespace distill_ops::store
