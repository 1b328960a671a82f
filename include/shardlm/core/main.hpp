#pragma once
// The body of every tool and example main: user errors become one clear line on stderr and exit code 1,
// never a crash or an uncaught exception.
#include <c10/util/Exception.h>

#include <cxxopts.hpp>
#include <exception>
#include <iostream>
#include <string_view>

#include "shardlm/core/errors.hpp"

namespace shardlm {

template <class F>
int guarded_main(std::string_view program, F&& body) {
  try {
    return body();
  } catch (const InternalError& e) {
    std::cerr << program << ": " << e.what() << " (please report this)\n";
  } catch (const Error& e) {
    std::cerr << program << ": error: " << e.what() << '\n';
  } catch (const cxxopts::exceptions::exception& e) {
    std::cerr << program << ": error: " << e.what() << " (see --help)\n";
  } catch (const c10::Error& e) {
    std::cerr << program << ": error: " << e.what_without_backtrace() << '\n';
  } catch (const std::exception& e) {
    std::cerr << program << ": error: " << e.what() << '\n';
  }
  return 1;
}

}  // namespace shardlm
