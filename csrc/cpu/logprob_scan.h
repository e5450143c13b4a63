// A scanner of OpenAI-style chat-completion logprobs (one JSON Lines record) straight into a
// target store's rows: the fields the ingest needs are read, everything else skipped, no DOM.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace distill_ops::ingest {

// Token bytes -> id of the student's vocabulary (ids without bytes, the special tokens, are
// absent; the first id of duplicate bytes wins).
class TokenMap {
 public:
  explicit TokenMap(const std::vector<std::string>& bytes, const std::vector<bool>& present);
  // The map holds views of store_'s strings: moving keeps them in place, copying would not.
  TokenMap(const TokenMap&) = delete;
  TokenMap& operator=(const TokenMap&) = delete;
  TokenMap(TokenMap&&) = default;
  TokenMap& operator=(TokenMap&&) = default;
  int find(const char* p, size_t n) const;
  int size() const { return size_; }

 private:
  std::vector<std::string> store_;  // the keys' storage (the map holds views of it)
  std::unordered_map<std::string_view, int> map_;
  int size_;
};

enum class ScanStatus : int { Ok = 0, Malformed = 1, BatchError = 2, NoLogprobs = 3,
                              Unmappable = 4 };

struct ScanResult {
  ScanStatus status = ScanStatus::Ok;
  std::string custom_id, id;  // empty when absent
  bool has_custom_id = false, has_id = false;
  bool has_temperature = false;
  double temperature = 0.0;
  int64_t rows = 0;
  std::vector<int32_t> ids;    // rows x k, -1 padded
  std::vector<float> lps;      // rows x k, -inf padded
  std::vector<int64_t> tokens; // rows: the chosen tokens
  int64_t unmapped_alternatives = 0;  // alternatives with no id (left out of their row)
  int64_t dropped_alternatives = 0;   // alternatives past k (the chosen token kept first)
  int64_t cut_positions = 0;          // positions after an unmappable chosen token
  int64_t max_alternatives = 0;       // the most top_logprobs at one position
};

// One line: a chat completion object, or a Batch API output line (`custom_id`, and the
// object under `response.body`). `k` slots per row: the chosen token, then its alternatives
// in the order given; a chosen token without an id ends the sequence (`skip_unmappable`:
// the whole line is Unmappable instead).
ScanResult scan_openai(const char* data, size_t n, const TokenMap& map, int k,
                       bool skip_unmappable);

}  // namespace distill_ops::ingest
