# Compiles SRC with CXX (-fsyntax-only) and checks the outcome: EXPECT=fail needs a failure whose
# output contains MESSAGE, EXPECT=pass needs success.
separate_arguments(_flags UNIX_COMMAND "${FLAGS}")
execute_process(COMMAND ${CXX} -std=c++17 -fsyntax-only ${_flags} ${SRC}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(EXPECT STREQUAL "pass")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${SRC} should compile but did not:\n${err}")
  endif()
else()
  if(rc EQUAL 0)
    message(FATAL_ERROR "${SRC} compiled but must be rejected")
  endif()
  string(FIND "${out}${err}" "${MESSAGE}" pos)
  if(pos EQUAL -1)
    message(FATAL_ERROR "${SRC} was rejected, but not with \"${MESSAGE}\":\n${err}")
  endif()
endif()
