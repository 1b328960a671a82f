// Anchor of the shared precompiled header (torch/torch.h, nlohmann/json.hpp); holds no code.
