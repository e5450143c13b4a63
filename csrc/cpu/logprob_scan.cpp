// JSON Lines records of OpenAI-style logprobs into target rows. A recursive-descent reader
// that decodes only the strings and numbers the ingest needs and skips everything else; a
// syntax error anywhere makes the line Malformed (never a crash, never a partial row).
#include "logprob_scan.h"

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string_view>

namespace distill_ops::ingest {

TokenMap::TokenMap(const std::vector<std::string>& bytes, const std::vector<bool>& present)
    : store_(bytes), size_(int(bytes.size())) {
  map_.reserve(bytes.size() * 2);
  for (size_t i = 0; i < store_.size(); ++i)
    if (present[i]) map_.emplace(std::string_view(store_[i]), int(i));
}

int TokenMap::find(const char* p, size_t n) const {
  const auto it = map_.find(std::string_view(p, n));
  return it == map_.end() ? -1 : it->second;
}

namespace {

struct Bad : std::exception {};

struct Reader {
  const char* p;
  const char* end;

  void ws() {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) ++p;
  }
  char peek() {
    ws();
    if (p >= end) throw Bad();
    return *p;
  }
  void expect(char c) {
    if (peek() != c) throw Bad();
    ++p;
  }
  bool take(char c) {
    if (peek() != c) return false;
    ++p;
    return true;
  }
  void literal(const char* word) {
    const size_t n = std::strlen(word);
    if (size_t(end - p) < n || std::memcmp(p, word, n) != 0) throw Bad();
    p += n;
  }
  bool null() {
    if (peek() != 'n') return false;
    literal("null");
    return true;
  }

  static void put_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }
  uint32_t hex4() {
    if (end - p < 4) throw Bad();
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = p[i];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= uint32_t(c - '0');
      else if (c >= 'a' && c <= 'f') v |= uint32_t(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= uint32_t(c - 'A' + 10);
      else throw Bad();
    }
    p += 4;
    return v;
  }
  // A string's decoded UTF-8 into `out` (or skipped when out is null).
  void string(std::string* out) {
    expect('"');
    if (out) out->clear();
    while (true) {
      if (p >= end) throw Bad();
      const char* run = p;
      while (p < end && *p != '"' && *p != '\\') ++p;
      if (out) out->append(run, size_t(p - run));
      if (p >= end) throw Bad();
      if (*p == '"') {
        ++p;
        return;
      }
      ++p;  // backslash
      if (p >= end) throw Bad();
      const char e = *p++;
      char c = 0;
      switch (e) {
        case '"': c = '"'; break;
        case '\\': c = '\\'; break;
        case '/': c = '/'; break;
        case 'b': c = '\b'; break;
        case 'f': c = '\f'; break;
        case 'n': c = '\n'; break;
        case 'r': c = '\r'; break;
        case 't': c = '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && end - p >= 6 && p[0] == '\\' && p[1] == 'u') {
            p += 2;
            const uint32_t lo = hex4();
            if (lo >= 0xDC00 && lo < 0xE000) {
              cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else {
              if (out) put_utf8(*out, 0xFFFD);
              cp = lo;
            }
          } else if (cp >= 0xD800 && cp < 0xE000) {
            cp = 0xFFFD;  // a lone surrogate
          }
          if (out) put_utf8(*out, cp);
          continue;
        }
        default: throw Bad();
      }
      if (out) *out += c;
    }
  }
  double number() {
    ws();
    double v = 0.0;
    const auto [stop, ec] = std::from_chars(p, end, v);
    if (ec != std::errc() || stop == p) throw Bad();
    p = stop;
    return v;
  }
  // A small non-negative integer (a byte value), without a floating-point parse.
  int small_int() {
    ws();
    int v = 0;
    const char* start = p;
    while (p < end && *p >= '0' && *p <= '9' && p - start < 4) v = v * 10 + (*p++ - '0');
    if (p == start || (p < end && (*p == '.' || *p == 'e' || *p == 'E'))) throw Bad();
    return v;
  }
  // An object key: a view of its raw bytes when it has no escapes (keys never do in
  // practice), else decoded into `buf`.
  std::string_view key(std::string& buf) {
    expect('"');
    const char* start = p;
    while (p < end && *p != '"' && *p != '\\') ++p;
    if (p < end && *p == '"') {
      const std::string_view v(start, size_t(p - start));
      ++p;
      return v;
    }
    p = start - 1;
    string(&buf);
    return buf;
  }
  void skip() {
    const char c = peek();
    if (c == '"') {
      string(nullptr);
    } else if (c == '{') {
      ++p;
      if (take('}')) return;
      do {
        string(nullptr);
        expect(':');
        skip();
      } while (take(','));
      expect('}');
    } else if (c == '[') {
      ++p;
      if (take(']')) return;
      do skip();
      while (take(','));
      expect(']');
    } else if (c == 't') {
      literal("true");
    } else if (c == 'f') {
      literal("false");
    } else if (c == 'n') {
      literal("null");
    } else {
      number();
    }
  }
  // Calls field(key) for each key of an object; field returns false to skip the value.
  template <typename F>
  void object(F&& field) {
    expect('{');
    if (take('}')) return;
    std::string buf;
    do {
      const std::string_view k = key(buf);
      expect(':');
      if (!field(k)) skip();
    } while (take(','));
    expect('}');
  }
  template <typename F>
  void array(F&& item) {
    expect('[');
    if (take(']')) return;
    int i = 0;
    do item(i++);
    while (take(','));
    expect(']');
  }
};

// One token of a response: its text, its logprob, and where its `bytes` array lies in the
// line (decoded only when the text does not identify the token).
struct Token {
  std::string text, bytes;
  const char* bytes_at = nullptr;
  bool has_text = false;
  double logprob = -std::numeric_limits<double>::infinity();
};

// The tokens of one position: the chosen one and its alternatives, reused across positions
// (no allocation once their strings have grown).
struct Position {
  Token chosen;
  std::vector<Token> alts;
  size_t n_alts = 0;
};

void read_token(Reader& r, Token& t, Position* pos) {
  t.has_text = false;
  t.bytes_at = nullptr;
  t.logprob = -std::numeric_limits<double>::infinity();
  r.object([&](std::string_view key) {
    if (key == "token") {
      if (r.null()) return true;
      r.string(&t.text);
      t.has_text = true;
    } else if (key == "logprob") {
      if (r.null()) return true;
      t.logprob = r.number();
    } else if (key == "bytes") {
      if (r.null()) return true;
      t.bytes_at = r.p;
      r.skip();
    } else if (key == "top_logprobs" && pos) {
      if (r.null()) return true;
      pos->n_alts = 0;
      r.array([&](int) {
        if (pos->n_alts == pos->alts.size()) pos->alts.emplace_back();
        read_token(r, pos->alts[pos->n_alts++], nullptr);
      });
    } else {
      return false;
    }
    return true;
  });
}

// The token's bytes from its `bytes` array (false when it has none).
bool decode_bytes(Token& t, const char* end) {
  if (!t.bytes_at) return false;
  Reader r{t.bytes_at, end};
  t.bytes.clear();
  r.array([&](int) {
    const int b = r.small_int();
    if (b > 255) throw Bad();
    t.bytes += char(b);
  });
  return true;
}

bool contains_replacement(const std::string& s) {
  return s.find("\xEF\xBF\xBD") != std::string::npos;
}

// The id of a token: "token_id:<n>" as given; whole-UTF-8 text by its bytes; else its bytes.
int token_id(Token& t, const TokenMap& map, const char* line_end) {
  static const char kIdPrefix[] = "token_id:";
  if (t.has_text && t.text.compare(0, sizeof kIdPrefix - 1, kIdPrefix) == 0) {
    const char* s = t.text.c_str() + sizeof kIdPrefix - 1;
    char* stop = nullptr;
    const long v = std::strtol(s, &stop, 10);
    if (stop == s || *stop != '\0' || v < 0 || v >= map.size()) return -1;
    return int(v);
  }
  if (t.has_text && !contains_replacement(t.text) && t.text.compare(0, 6, "bytes:") != 0) {
    const int i = map.find(t.text.data(), t.text.size());
    if (i >= 0) return i;
  }
  if (decode_bytes(t, line_end)) return map.find(t.bytes.data(), t.bytes.size());
  return -1;
}

struct Scan {
  Scan(const TokenMap& m, int k_, ScanResult& r, const char* end)
      : map(m), k(k_), res(r), line_end(end) {}
  const TokenMap& map;
  int k;
  ScanResult& res;
  const char* line_end;
  bool found_content = false;
  bool stopped = false;  // an unmappable chosen token ended the sequence
  Position pos;

  void content(Reader& r) {
    found_content = true;
    r.array([&](int) {
      Token& tok = pos.chosen;
      pos.n_alts = 0;
      read_token(r, tok, &pos);
      if (stopped) {
        ++res.cut_positions;
        return;
      }
      res.max_alternatives = std::max<int64_t>(res.max_alternatives, int64_t(pos.n_alts));
      const int chosen = token_id(tok, map, line_end);
      if (chosen < 0 || !std::isfinite(tok.logprob)) {
        stopped = true;
        ++res.cut_positions;
        return;
      }
      const size_t base = res.ids.size();
      res.ids.resize(base + size_t(k), -1);
      res.lps.resize(base + size_t(k), -std::numeric_limits<float>::infinity());
      res.ids[base] = chosen;
      res.lps[base] = float(tok.logprob);
      int filled = 1;
      for (size_t ai = 0; ai < pos.n_alts; ++ai) {
        Token& a = pos.alts[ai];
        const int id = token_id(a, map, line_end);
        if (id < 0) {
          ++res.unmapped_alternatives;
          continue;
        }
        bool seen = false;
        for (int j = 0; j < filled; ++j) seen = seen || res.ids[base + size_t(j)] == id;
        if (seen) continue;
        if (filled == k) {
          ++res.dropped_alternatives;
          continue;
        }
        res.ids[base + size_t(filled)] = id;
        res.lps[base + size_t(filled)] = float(a.logprob);
        ++filled;
      }
      res.tokens.push_back(chosen);
      ++res.rows;
    });
  }
  void logprobs(Reader& r) {
    if (r.null()) return;
    r.object([&](std::string_view key) {
      if (key != "content") return false;
      if (!r.null()) content(r);
      return true;
    });
  }
  void choices(Reader& r) {
    r.array([&](int i) {
      if (i != 0) {
        r.skip();
        return;
      }
      r.object([&](std::string_view key) {
        if (key != "logprobs") return false;
        logprobs(r);
        return true;
      });
    });
  }
  // A chat completion object (the line itself, or a Batch API response body).
  bool completion_field(Reader& r, std::string_view key) {
    if (key == "id") {
      if (r.null()) return true;
      r.string(&res.id);
      res.has_id = true;
    } else if (key == "choices") {
      if (!r.null()) choices(r);
    } else if (key == "temperature") {
      if (r.null()) return true;
      res.temperature = r.number();
      res.has_temperature = true;
    } else {
      return false;
    }
    return true;
  }
};

}  // namespace

ScanResult scan_openai(const char* data, size_t n, const TokenMap& map, int k,
                       bool skip_unmappable) {
  ScanResult res;
  Scan s(map, k, res, data + n);
  Reader r{data, data + n};
  bool batch_error = false;
  try {
    r.object([&](std::string_view key) {
      if (key == "custom_id") {
        if (r.null()) return true;
        r.string(&res.custom_id);
        res.has_custom_id = true;
        return true;
      }
      if (key == "response") {
        if (r.null()) {
          batch_error = true;
          return true;
        }
        r.object([&](std::string_view rkey) {
          if (rkey == "status_code") {
            batch_error = batch_error || r.number() != 200.0;
            return true;
          }
          if (rkey != "body") return false;
          if (r.null()) {
            batch_error = true;
            return true;
          }
          r.object([&](std::string_view bkey) { return s.completion_field(r, bkey); });
          return true;
        });
        return true;
      }
      return s.completion_field(r, key);
    });
    r.ws();
    if (r.p != r.end) throw Bad();
  } catch (const Bad&) {
    ScanResult bad;
    bad.status = ScanStatus::Malformed;
    return bad;
  }
  if (batch_error) {
    res.status = ScanStatus::BatchError;
  } else if (!s.found_content) {
    res.status = ScanStatus::NoLogprobs;
  } else if (res.rows == 0 || (s.stopped && skip_unmappable)) {
    res.status = ScanStatus::Unmappable;
  }
  if (res.status != ScanStatus::Ok) {
    res.ids.clear();
    res.lps.clear();
    res.tokens.clear();
    res.rows = 0;
  }
  return res;
}

}  // namespace distill_ops::ingest
