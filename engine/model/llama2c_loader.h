// Loader for llama2.c checkpoints (.bin: 7 int32 header fields, then float32 tensors).
// Stateless functions; thread-safe.
#pragma once

#include <memory>
#include <string>

#include "engine/common/status.h"
#include "engine/model/weights.h"

namespace helix {

// Reads the whole checkpoint. Errors name the path and what was wrong (missing file,
// truncated tensor data, implausible header) instead of crashing.
StatusOr<std::unique_ptr<LoadedModel>> LoadLlama2cModel(const std::string& path);

}  // namespace helix
