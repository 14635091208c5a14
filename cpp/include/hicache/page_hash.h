// Page hashes: SGLang 0.5.23's SHA-256 chain over page tokens, the keys of the storage (L3) tier.
//
// Page i of a key is identified by digest_i = SHA256(digest_{i-1} || tokens_i as little-endian
// uint32); digest_{-1} is absent, or the namespace seed of the key's extra_key. Equal digests mean
// equal prefixes in the same namespace, so keys are stable across processes and engines. This is
// SGLang's get_hash_str / storage_namespace_seed (reference §6.1), byte for byte the same as
// src/hicache/storage/page_hash.py. Tokens are int32 here: a negative token is hashed as its
// uint32 bit pattern (SGLang's uint64 form for tokens >= 2**32 cannot occur).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "hicache/types.h"

namespace hicache {

using Digest = std::array<uint8_t, 32>;

// A streaming SHA-256 (FIPS 180-4). Small and dependency-free: the core links no OpenSSL.
class Sha256 {
 public:
  Sha256();
  void update(const uint8_t* data, size_t len);
  Digest digest();  // finishes the hash; the object must not be updated afterwards

 private:
  void block(const uint8_t* chunk);
  std::array<uint32_t, 8> state_;
  std::array<uint8_t, 64> buffer_{};
  size_t buffered_ = 0;
  uint64_t total_bytes_ = 0;
};

// SHA256(b"sglang-cache-namespace-v1" || framed(extra_key) || b"\x00"), framed(s) = b"\x01" ||
// len(s) as 8-byte little-endian || s: SGLang's storage_namespace_seed(extra_key, cache_salt=None).
// extra_key is the UTF-8 bytes of the namespace; callers pass no seed for an absent namespace.
Digest namespace_seed(std::string_view extra_key);

// Appends the digests of key[0:len]'s pages (a short last page is hashed as it is) to `out`,
// chaining from `previous` (nullptr: unseeded). O(len).
void append_page_hashes(const Token* key, size_t len, int64_t page_size, const Digest* previous,
                        std::vector<Digest>& out);

}  // namespace hicache
