#include <gtest/gtest.h>
#include <procpool/procpool.hpp>
TEST(Smoke, Map) {
  std::vector<int> v{1,2,3};
  auto r = procpool::map([](int x){ return x*2; }, v);
  EXPECT_EQ(r, (std::vector<int>{2,4,6}));
}
