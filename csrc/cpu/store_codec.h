// Encoding of one sequence's sparse targets (ids [T, k], log-probabilities [T, k]) into the
// payload of a store record, and back. See python/distill_ops/store/__init__.py for the
// format as users see it; the bit layout is documented in store_codec.cpp.
#pragma once

#include <cstdint>
#include <vector>

namespace distill_ops::store {

// Codes shared with python/distill_ops/store/_codec.py.
enum class ValueEncoding : int { F16 = 0, BF16 = 1, Compact = 2 };

struct CodecParams {
  int64_t vocab;     // V: ids lie in [0, V)
  int64_t k;         // slots per token
  int encoding;      // ValueEncoding
  int64_t head;      // compact: the `head` largest values per token get `head_tol`
  double head_tol;   // compact: max |error| (nats) of a head value
  double tail_tol;   // compact: max |error| (nats) of any other value
  int head_min_bits; // compact: a head value takes at least this many bits (unless constant)
};

// What encoding lost, for the store's statistics.
struct EncodeStats {
  double max_err_head = 0.0;  // max |decoded - original| over head values (raw: all values)
  double max_err_tail = 0.0;  // ... over the other values
};

// Bits of one id of a vocabulary of `vocab` ids: ceil(log2(vocab)), at least 1.
int id_bits(int64_t vocab);

// Encodes T tokens. ids: [T, k] int32, each row its valid ids (in [0, V), unique) followed by
// -1 padding; lp: [T, k] float32 (finite or -inf where valid; ignored where padded). The
// caller (Python) has checked all of that. Appends the payload to `out`.
EncodeStats encode(const int32_t* ids, const float* lp, int64_t T, const CodecParams& p,
                   std::vector<uint8_t>& out);

// Decodes a payload of `nbytes` into ids [T, k] int32 and lp [T, k] float32 (padding: -1 and
// -inf). Raw encodings give the stored order; compact gives ascending ids. Returns false,
// having written something unspecified, if the payload is inconsistent (never reads outside
// it).
bool decode(const uint8_t* data, int64_t nbytes, int64_t T, const CodecParams& p, int32_t* ids,
            float* lp);

}  // namespace distill_ops::store
