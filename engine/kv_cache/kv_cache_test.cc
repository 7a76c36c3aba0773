#include <set>

#include <gtest/gtest.h>

#include "engine/kv_cache/block_pool.h"
#include "engine/kv_cache/placement.h"
#include "engine/kv_cache/sequence_kv.h"

namespace helix {
namespace {

TEST(PlacementTest, OwnerFollowsBlockModCp) {
  EXPECT_EQ(OwnerRank(0, 4, 2), 0);
  EXPECT_EQ(OwnerRank(3, 4, 2), 0);
  EXPECT_EQ(OwnerRank(4, 4, 2), 1);
  EXPECT_EQ(OwnerRank(8, 4, 2), 0);
  EXPECT_EQ(OwnerRank(13, 4, 3), 0);  // block 3
  EXPECT_EQ(OwnerRank(5, 1, 3), 2);
}

TEST(PlacementTest, LocalCountsMatchBruteForce) {
  for (int cp : {1, 2, 3, 4, 8}) {
    for (int64_t tpb : {1, 4, 5, 32}) {
      for (int64_t n = 0; n < 300; n += 7) {
        for (int r = 0; r < cp; ++r) {
          int64_t tokens = 0;
          std::set<int64_t> blocks;
          for (int64_t p = 0; p < n; ++p) {
            if (OwnerRank(p, tpb, cp) == r) {
              ++tokens;
              blocks.insert(p / tpb);
            }
          }
          ASSERT_EQ(LocalTokenCount(n, tpb, cp, r), tokens) << cp << " " << tpb << " " << n;
          ASSERT_EQ(LocalBlockCount(n, tpb, cp, r), static_cast<int64_t>(blocks.size()));
        }
      }
    }
  }
}

TEST(BlockPoolTest, AllocateFreeAllOrNothing) {
  auto pool = BlockPool::Create(8, 100);
  ASSERT_TRUE(pool.ok());
  BlockPool& p = **pool;
  EXPECT_EQ(p.block_bytes(), 100);  // no padding: the stride the kernels use
  std::vector<int32_t> a, b;
  EXPECT_TRUE(p.Allocate(5, &a));
  EXPECT_FALSE(p.Allocate(4, &b));  // all or nothing
  EXPECT_TRUE(b.empty());
  EXPECT_EQ(p.num_free(), 3);
  p.Free(a);
  p.Free(a);  // double free is reported and ignored
  EXPECT_EQ(p.num_free(), 8);
  EXPECT_FALSE(BlockPool::Create(0, 10).ok());
}

TEST(SequenceKvTest, Cp2ReservesOnlyOwnedBlocks) {
  auto pool = BlockPool::Create(16, 64);
  ASSERT_TRUE(pool.ok());
  SequenceKv r0(4, 2, 0), r1(4, 2, 1);
  ASSERT_TRUE(r0.Reserve(pool->get(), 10));  // global blocks 0, 1, 2 → rank 0: 0, 2
  ASSERT_TRUE(r1.Reserve(pool->get(), 10));
  EXPECT_EQ(r0.blocks().size(), 2u);
  EXPECT_EQ(r1.blocks().size(), 1u);
  EXPECT_EQ(r0.block_first_pos(), (std::vector<int32_t>{0, 8}));
  EXPECT_EQ(r1.block_first_pos(), (std::vector<int32_t>{4}));
  for (int64_t p = 0; p < 10; ++p) {
    SequenceKv& s = r0.Owns(p) ? r0 : r1;
    auto [block, slot] = s.Append(p);
    EXPECT_EQ(slot, p % 4);
    EXPECT_EQ(block, s.blocks()[(s.local_tokens() - 1) / 4]);
  }
  EXPECT_EQ(r0.local_tokens(), 6);
  EXPECT_EQ(r1.local_tokens(), 4);
  r0.Release(pool->get());
  r1.Release(pool->get());
  EXPECT_EQ((*pool)->num_free(), 16);
}

}  // namespace
}  // namespace helix
