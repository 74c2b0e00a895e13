// A result larger than 4 GiB crosses the process boundary intact.
// Needs ~9 GiB of memory (the worker's result and its copy on the way; the
// caller holds the result once); labelled "huge" so CI may skip it.
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include <sys/resource.h>

#include <chrono>
#include <iostream>
#include <vector>

TEST(HugePayload, ResultOver4GiBRoundTrips) {
  const std::size_t size = (std::size_t{4} << 30) + 12345;  // 4 GiB + a bit: 32-bit sizes break
  const auto start = std::chrono::steady_clock::now();
  auto results = procpool::map(
      [size](int seed) {
        std::vector<unsigned char> big(size);
        for (std::size_t i = 0; i < size; i += 4096)
          big[i] = static_cast<unsigned char>(seed + i / 4096);
        big[size - 1] = 0xAB;
        return big;
      },
      std::vector{7}, {.processes = 1});
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_EQ(results.size(), 1u);
  const auto& big = results[0];
  ASSERT_EQ(big.size(), size);
  for (std::size_t i = 0; i < size - 1; i += 4096 * 1021) {
    ASSERT_EQ(big[i], static_cast<unsigned char>(7 + i / 4096)) << i;
  }
  EXPECT_EQ(big[size - 1], 0xAB);
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  // The caller's own peak (time -v reports the largest of it and its workers).
  const double peak_gb = static_cast<double>(usage.ru_maxrss) * 1024 / 1e9;
  std::cout << "4 GiB + 12345 B result round trip: " << seconds << " s, the caller's peak RSS "
            << peak_gb << " GB\n";
  // The result is N bytes; decoding it must not hold it twice (N plus pieces
  // of 64 MiB, plus the test's own few MB).
  EXPECT_LT(peak_gb, static_cast<double>(size) / 1e9 + 0.5);
}
