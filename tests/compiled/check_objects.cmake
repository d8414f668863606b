# The user unit of moereg::compiled defines no loss entry point (execute / execute_stats in a
# moereg ABI namespace) and references them, and the library defines them.
# Usage: cmake -DNM=nm -DOBJECTS=a.o -DLIBRARY=libmoereg_compiled.a -P check_objects.cmake
execute_process(COMMAND ${NM} -C ${OBJECTS} OUTPUT_VARIABLE user RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${NM} failed on ${OBJECTS}")
endif()
set(entry "moereg::abi_[a-z0-9_]+::execute(_stats)?<")
string(REGEX MATCHALL "\n[0-9a-f]* *[TtWwVv] [^\n]*${entry}[^\n]*" defined "${user}")
if(defined)
  message(FATAL_ERROR "the user unit instantiates loss entry points itself:${defined}")
endif()
string(REGEX MATCHALL "\n *U [^\n]*${entry}[^\n]*" referenced "${user}")
list(LENGTH referenced n_ref)
if(n_ref LESS 16)
  message(FATAL_ERROR "the user unit references ${n_ref} loss entry points of the library; expected at least 16")
endif()
execute_process(COMMAND ${NM} -C --defined-only ${LIBRARY} OUTPUT_VARIABLE lib RESULT_VARIABLE rc)
string(REGEX MATCHALL "\n[0-9a-f]+ [TW] [^\n]*${entry}[^\n]*" provided "${lib}")
list(LENGTH provided n_lib)
if(n_lib LESS 96)  # 6 router losses x 4 types x 2 + 2 activation losses x 4 types x 3 layouts x 2
  message(FATAL_ERROR "the library defines ${n_lib} loss entry points; expected 96")
endif()
message(STATUS "compiled: the user unit references ${n_ref} entry points and defines none; the library defines ${n_lib}")
