# The `docs` target: moereg's API documentation (HTML) built by Doxygen from the public
# headers (CPU and CUDA) and the pages under docs/ (docs/Doxyfile.in). Defined only when
# moereg is the top-level project and Doxygen is found; any Doxygen warning (an undocumented
# public name, a broken reference) fails the build.
#
#   cmake --build build --target docs     # -> build/docs/html/index.html

if(NOT MOEREG_TOP_LEVEL)  # a project that vendors moereg builds its own docs
  return()
endif()

find_package(Doxygen QUIET)
if(NOT DOXYGEN_FOUND)
  message(STATUS "moereg: Doxygen not found; the docs target is not defined")
  return()
endif()

set(MOEREG_DOCS_OUTPUT_DIR "${CMAKE_BINARY_DIR}/docs")
configure_file("${PROJECT_SOURCE_DIR}/docs/Doxyfile.in" "${MOEREG_DOCS_OUTPUT_DIR}/Doxyfile" @ONLY)

# Always rerun when asked for: Doxygen is quick here, and a failed run (a warning) must not
# leave anything that looks up to date.
add_custom_target(docs
  COMMAND "${CMAKE_COMMAND}" -E make_directory "${MOEREG_DOCS_OUTPUT_DIR}"
  COMMAND Doxygen::doxygen "${MOEREG_DOCS_OUTPUT_DIR}/Doxyfile"
  WORKING_DIRECTORY "${PROJECT_SOURCE_DIR}"
  COMMENT "Building the API documentation with Doxygen (${MOEREG_DOCS_OUTPUT_DIR}/html)"
  VERBATIM)
