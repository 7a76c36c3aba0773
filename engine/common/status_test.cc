#include "engine/common/status.h"

#include <gtest/gtest.h>

#include <string>

#include "engine/common/json_nesting.h"
#include "engine/common/printable.h"

namespace helix {
namespace {

StatusOr<int> Half(int x) {
  if (x % 2 != 0) return InvalidArgument("odd: " + std::to_string(x));
  return x / 2;
}

Status Quarter(int x, int* out) {
  ASSIGN_OR_RETURN(int h, Half(x));
  ASSIGN_OR_RETURN(*out, Half(h));
  return Status::Ok();
}

TEST(StatusTest, OkAndErrors) {
  EXPECT_TRUE(Status::Ok().ok());
  Status s = NotFound("no model");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_EQ(s.ToString(), "NOT_FOUND: no model");
  EXPECT_EQ(s.WithPrefix("cfg.json").ToString(), "NOT_FOUND: cfg.json: no model");
}

TEST(StatusTest, AssignOrReturnPropagates) {
  int out = 0;
  EXPECT_TRUE(Quarter(8, &out).ok());
  EXPECT_EQ(out, 2);
  Status s = Quarter(6, &out);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "odd: 3");
}

TEST(StatusTest, StatusOrFromOkStatusIsAnError) {
#ifdef NDEBUG
  StatusOr<int> v{Status::Ok()};
  EXPECT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), StatusCode::kInternal);
#else
  GTEST_SKIP() << "asserts in debug builds; the release path is checked in release builds";
#endif
}

TEST(JsonNestingTest, CountsBracketsOutsideStrings) {
  EXPECT_EQ(JsonNestingDepth(R"({"a": [1, {"b": []}]})", 64), 4);
  EXPECT_EQ(JsonNestingDepth(R"({"a": "[[[{{{", "b": "\"[["})", 64), 1);  // in strings
  EXPECT_EQ(JsonNestingDepth("3", 64), 0);
  EXPECT_EQ(JsonNestingDepth(std::string(100000, '['), 64), 65);  // stops past the limit
  EXPECT_EQ(JsonNestingDepth("]]]][", 64), 1);                    // malformed: left to the parser
}

// Every value the parser would make a node of: containers, strings (keys too), literals.
TEST(JsonNestingTest, ShapeCountsValuesAndStopsPastTheLimits) {
  const JsonTextShape s =
      JsonShape(R"({"a": [1, -2.5e3, {"b": []}], "c": true, "d": null})", 64, 100);
  EXPECT_EQ(s.depth, 4);
  EXPECT_EQ(s.values, 12u);  // { "a" [ 1 -2.5e3 { "b" [ "c" true "d" null
  EXPECT_EQ(JsonShape(R"(["[1,2]", "\"{", 3])", 64, 100).values, 4u);  // in strings: not values
  EXPECT_EQ(JsonShape("  42 ", 64, 100).values, 1u);
  EXPECT_EQ(JsonShape("", 64, 100).values, 0u);
  std::string many = "[";
  for (int i = 0; i < 1000; ++i) many += "[],";
  many += "[]]";
  EXPECT_EQ(JsonShape(many, 64, 2000).values, 1002u);
  EXPECT_EQ(JsonShape(many, 64, 10).values, 11u);  // stops past the limit
  EXPECT_EQ(JsonShape(std::string(100000, '['), 64, 1u << 20).depth, 65);
  // The check names the file and the limit passed; the router's nesting check is unchanged.
  EXPECT_TRUE(CheckJsonFileShape(many, "t.json", 1002).ok());
  const Status values = CheckJsonFileShape(many, "t.json", 1001);
  EXPECT_EQ(values.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(values.message().find("t.json: JSON holds more than 1001 values"), std::string::npos)
      << values.ToString();
  const Status deep = CheckJsonFileShape(std::string(100, '['), "t.json");
  EXPECT_EQ(deep.message(), "t.json: JSON nested deeper than 64 levels");
}

TEST(PrintableTest, EscapesControlBytesAndCutsLongText) {
  EXPECT_EQ(Printable("plain \\p{N} caf\xC3\xA9"), "plain \\p{N} caf\xC3\xA9");
  EXPECT_EQ(Printable(std::string("a\0b\n\t\x7f\x1b", 7)), "a\\x00b\\n\\t\\x7f\\x1b");
  const std::string long_text(200000, 'x');
  EXPECT_EQ(Printable(long_text, 10), "xxxxxxxxxx...(200000 bytes)");
  EXPECT_LT(Printable(long_text).size(), 200u);
  // Cut at a character boundary: "é" is two bytes.
  EXPECT_EQ(Printable("\xC3\xA9\xC3\xA9", 3), "\xC3\xA9...(4 bytes)");
}

}  // namespace
}  // namespace helix
