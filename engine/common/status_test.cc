#include "engine/common/status.h"

#include <gtest/gtest.h>

#include <string>

#include "engine/common/json_nesting.h"

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

}  // namespace
}  // namespace helix
