#include "engine/request/stop_matcher.h"

#include <gtest/gtest.h>

namespace helix {
namespace {

TEST(StopMatcherTest, HoldsBackPossiblePrefixAndCutsAtStop) {
  StopMatcher m({"The end"});
  bool stopped = false;
  EXPECT_EQ(m.Push("Once upon", &stopped), "Once upon");
  EXPECT_EQ(m.Push(" a time. The", &stopped), " a time. ");  // "The" could start "The end"
  EXPECT_FALSE(stopped);
  EXPECT_EQ(m.Push(" e", &stopped), "");
  EXPECT_EQ(m.Push("nd!", &stopped), "");
  EXPECT_TRUE(stopped);
}

TEST(StopMatcherTest, ReleasesHeldTextWhenItDiverges) {
  StopMatcher m({"abc"});
  bool stopped = false;
  EXPECT_EQ(m.Push("xab", &stopped), "x");
  EXPECT_EQ(m.Push("d", &stopped), "abd");
  EXPECT_EQ(m.Push("ab", &stopped), "");
  EXPECT_EQ(m.Flush(), "ab");
  EXPECT_FALSE(stopped);
}

TEST(StopMatcherTest, EarliestOfSeveralStopsAndNoStops) {
  StopMatcher m({"zz", "y"});
  bool stopped = false;
  EXPECT_EQ(m.Push("ab y zz", &stopped), "ab ");
  EXPECT_TRUE(stopped);
  StopMatcher none({});
  EXPECT_EQ(none.Push("anything", &stopped), "anything");
  EXPECT_FALSE(stopped);
}

}  // namespace
}  // namespace helix
