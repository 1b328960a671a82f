# run(<command> <args>...) for the CMake scripts of the tests: runs the command and fails with its output when it exits
# non-zero; leaves what it printed (stdout and stderr together) in run_output (and in out) in the caller's scope.
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}")
  endif()
  set(run_output "${out}" PARENT_SCOPE)
  set(out "${out}" PARENT_SCOPE)
endfunction()
