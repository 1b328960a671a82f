#pragma once
// The optional compiled part of the library (the {fmt}/spdlog pattern). shardlm is header-only; a program may also
// link `shardlm::compiled` (a static library built from src/shardlm_compiled.cpp), which defines SHARDLM_COMPILED:
// the entry points that do not depend on a policy or a program (the trainer, the whole run, the command line, the
// models' factories) are then declared `extern template` and compiled once, in the library, instead of in every
// program that includes them. Header-only use (shardlm::shardlm) compiles them where they are used, as before.
//
// SHARDLM_EXTERN_TEMPLATE(declaration): an explicit instantiation declaration in compiled mode, nothing otherwise.
// The library's source defines SHARDLM_COMPILING before including the headers and instantiates each of them.
#if defined(SHARDLM_COMPILED) && !defined(SHARDLM_COMPILING)
#define SHARDLM_EXTERN_TEMPLATE(...) extern template __VA_ARGS__;
#else
#define SHARDLM_EXTERN_TEMPLATE(...)
#endif
