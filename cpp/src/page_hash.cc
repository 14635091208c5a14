#include "hicache/page_hash.h"

#include <algorithm>
#include <cstring>

namespace hicache {

namespace {

constexpr std::array<uint32_t, 64> kRound = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

constexpr char kNamespaceTag[] = "sglang-cache-namespace-v1";

}  // namespace

Sha256::Sha256()
    : state_{0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
             0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19} {}

void Sha256::block(const uint8_t* chunk) {
  uint32_t w[64];
  for (int i = 0; i < 16; ++i) {
    w[i] = (uint32_t{chunk[4 * i]} << 24) | (uint32_t{chunk[4 * i + 1]} << 16) |
           (uint32_t{chunk[4 * i + 2]} << 8) | uint32_t{chunk[4 * i + 3]};
  }
  for (int i = 16; i < 64; ++i) {
    const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
    const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  uint32_t a = state_[0], b = state_[1], c = state_[2], d = state_[3];
  uint32_t e = state_[4], f = state_[5], g = state_[6], h = state_[7];
  for (int i = 0; i < 64; ++i) {
    const uint32_t t1 =
        h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + kRound[i] + w[i];
    const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
    h = g;
    g = f;
    f = e;
    e = d + t1;
    d = c;
    c = b;
    b = a;
    a = t1 + t2;
  }
  state_[0] += a;
  state_[1] += b;
  state_[2] += c;
  state_[3] += d;
  state_[4] += e;
  state_[5] += f;
  state_[6] += g;
  state_[7] += h;
}

void Sha256::update(const uint8_t* data, size_t len) {
  total_bytes_ += len;
  if (buffered_ > 0) {
    const size_t take = std::min(len, buffer_.size() - buffered_);
    std::memcpy(buffer_.data() + buffered_, data, take);
    buffered_ += take;
    data += take;
    len -= take;
    if (buffered_ < buffer_.size()) return;
    block(buffer_.data());
    buffered_ = 0;
  }
  for (; len >= 64; data += 64, len -= 64) block(data);
  std::memcpy(buffer_.data(), data, len);
  buffered_ = len;
}

Digest Sha256::digest() {
  const uint64_t bits = total_bytes_ * 8;
  const uint8_t one = 0x80;
  update(&one, 1);
  const uint8_t zero = 0;
  while (buffered_ != 56) update(&zero, 1);
  uint8_t length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<uint8_t>(bits >> (56 - 8 * i));
  update(length, 8);
  Digest out;
  for (int i = 0; i < 8; ++i) {
    for (int j = 0; j < 4; ++j) out[4 * i + j] = static_cast<uint8_t>(state_[i] >> (24 - 8 * j));
  }
  return out;
}

Digest namespace_seed(std::string_view extra_key) {
  Sha256 h;
  h.update(reinterpret_cast<const uint8_t*>(kNamespaceTag), sizeof(kNamespaceTag) - 1);
  uint8_t frame[9];
  frame[0] = 0x01;
  const uint64_t len = extra_key.size();
  for (int i = 0; i < 8; ++i) frame[1 + i] = static_cast<uint8_t>(len >> (8 * i));
  h.update(frame, sizeof(frame));
  h.update(reinterpret_cast<const uint8_t*>(extra_key.data()), extra_key.size());
  const uint8_t absent_salt = 0x00;
  h.update(&absent_salt, 1);
  return h.digest();
}

void append_page_hashes(const Token* key, size_t len, int64_t page_size, const Digest* previous,
                        std::vector<Digest>& out) {
  const size_t page = static_cast<size_t>(page_size);
  out.reserve(out.size() + (len + page - 1) / page);
  std::vector<uint8_t> bytes(page * 4);
  Digest chain{};  // a copy: `previous` may point into a vector that `out` reallocates
  const bool seeded = previous != nullptr;
  if (seeded) chain = *previous;
  for (size_t start = 0; start < len; start += page) {
    const size_t n = std::min(page, len - start);
    for (size_t i = 0; i < n; ++i) {
      const auto t = static_cast<uint32_t>(key[start + i]);
      bytes[4 * i] = static_cast<uint8_t>(t);
      bytes[4 * i + 1] = static_cast<uint8_t>(t >> 8);
      bytes[4 * i + 2] = static_cast<uint8_t>(t >> 16);
      bytes[4 * i + 3] = static_cast<uint8_t>(t >> 24);
    }
    Sha256 h;
    if (seeded || start > 0) h.update(chain.data(), chain.size());
    h.update(bytes.data(), 4 * n);
    chain = h.digest();
    out.push_back(chain);
  }
}

}  // namespace hicache
