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

TEST(StopMatcherTest, IncludeStopKeepsTheStopString) {
  StopMatcher m({"end", "e"}, /*include_stop=*/true);
  bool stopped = false;
  EXPECT_EQ(m.Push("Th", &stopped), "Th");
  EXPECT_EQ(m.Push("e end.", &stopped), "e");  // "e" comes first, and stays
  EXPECT_TRUE(stopped);
  StopMatcher held({"The end"}, true);
  EXPECT_EQ(held.Push("Once. The e", &stopped), "Once. ");
  EXPECT_EQ(held.Push("nd!", &stopped), "The end");  // the held prefix and the rest of the stop
  EXPECT_TRUE(stopped);
  StopMatcher same_place({"ab", "abc"}, true);  // at one place: the first listed
  EXPECT_EQ(same_place.Push("xabcd", &stopped), "xab");
}

TEST(StopMatcherTest, PassedThroughTextCanStartAStopButNotHoldOne) {
  bool stopped = false;
  // "The e" is not matched (min_tokens) but held back, as it may start "The end"; "nd"
  // completes it and the text ends before it.
  StopMatcher m({"The end"});
  EXPECT_EQ(m.PassThrough("Once. The e"), "Once. ");
  EXPECT_EQ(m.Push("nd!", &stopped), "");
  EXPECT_TRUE(stopped);
  StopMatcher kept({"The end"}, /*include_stop=*/true);
  EXPECT_EQ(kept.PassThrough("Once. The e"), "Once. ");
  EXPECT_EQ(kept.Push("nd!", &stopped), "The end");
  EXPECT_TRUE(stopped);
  // A stop string wholly in the passed text is not matched, even when held back as the start
  // of a longer one.
  StopMatcher whole({"end", "xyz"});
  EXPECT_EQ(whole.PassThrough("the end, x"), "the end, ");
  EXPECT_EQ(whole.Push(" and", &stopped), "x and");
  EXPECT_FALSE(stopped);
  StopMatcher inner({"ab", "xaby"});
  EXPECT_EQ(inner.PassThrough("-xab"), "-");  // "ab" inside, "xab" may start "xaby"
  EXPECT_EQ(inner.Push("c", &stopped), "xabc");
  EXPECT_FALSE(stopped);
  StopMatcher flush({"xyz"});
  EXPECT_EQ(flush.PassThrough("abc x"), "abc ");
  EXPECT_EQ(flush.Push("y", &stopped), "");
  EXPECT_EQ(flush.Flush(), "xy");
  StopMatcher none({});
  EXPECT_EQ(none.PassThrough("abc"), "abc");
  EXPECT_EQ(none.Push("d", &stopped), "d");
}

}  // namespace
}  // namespace helix
