# Builds and runs tests/packaging/consumer against moereg.
#   -DMODE=find_package|install_unbuilt|add_subdirectory|copy|pkg_config  -DSOURCE_DIR= -DBUILD_DIR= -DWORK_DIR= [-DVERSION=] [-DCXX=] [-DEIGEN_INC=]
cmake_minimum_required(VERSION 3.18)

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
set(consumer ${SOURCE_DIR}/tests/packaging/consumer)
if(NOT DEFINED VERSION)
  set(VERSION 0.1)
endif()

if(NOT DEFINED COMPILED)
  set(COMPILED OFF)
endif()

if(MODE STREQUAL "find_package")
  run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${WORK_DIR}/prefix)
  run(${CMAKE_COMMAND} -S ${consumer} -B ${WORK_DIR}/build -DMOEREG_CONSUMER_MODE=find_package
      -DMOEREG_REQUIRED_VERSION=${VERSION} -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix -DMOEREG_CONSUMER_COMPILED=${COMPILED})
elseif(MODE STREQUAL "install_unbuilt")
  # A fresh configure of moereg, tools on, nothing built: the install must still work (headers
  # and package; the unbuilt moereg-eval is skipped) and the package must be usable.
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/moereg-build -DMOEREG_BUILD_TESTS=OFF
      -DMOEREG_BUILD_EXAMPLES=OFF -DMOEREG_BUILD_BENCHMARKS=OFF -DMOEREG_BUILD_TOOLS=ON)
  run(${CMAKE_COMMAND} --install ${WORK_DIR}/moereg-build --prefix ${WORK_DIR}/prefix)
  if(NOT EXISTS ${WORK_DIR}/prefix/include/moereg/moereg.hpp)
    message(FATAL_ERROR "install of an unbuilt tree did not install the headers")
  endif()
  # By default the package is header-only: no compiled component, and asking for it fails.
  file(GLOB_RECURSE _compiled ${WORK_DIR}/prefix/*moeregCompiledTargets*.cmake ${WORK_DIR}/prefix/*moereg_compiled*)
  if(_compiled)
    message(FATAL_ERROR "the default install contains the compiled component: ${_compiled}")
  endif()
  execute_process(COMMAND ${CMAKE_COMMAND} -S ${consumer} -B ${WORK_DIR}/build-compiled
                  -DMOEREG_CONSUMER_MODE=find_package -DMOEREG_CONSUMER_COMPILED=ON
                  -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix RESULT_VARIABLE rc OUTPUT_QUIET ERROR_QUIET)
  if(rc EQUAL 0)
    message(FATAL_ERROR "find_package(moereg COMPONENTS compiled) succeeded without the component installed")
  endif()
  run(${CMAKE_COMMAND} -S ${consumer} -B ${WORK_DIR}/build -DMOEREG_CONSUMER_MODE=find_package
      -DMOEREG_REQUIRED_VERSION=${VERSION} -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
elseif(MODE STREQUAL "add_subdirectory")
  run(${CMAKE_COMMAND} -S ${consumer} -B ${WORK_DIR}/build -DMOEREG_CONSUMER_MODE=add_subdirectory
      -DMOEREG_SOURCE_DIR=${SOURCE_DIR})
elseif(MODE STREQUAL "copy")
  # Plain copying of include/: no CMake on the consumer side, only a compiler and Eigen.
  file(COPY ${SOURCE_DIR}/include/moereg DESTINATION ${WORK_DIR}/vendor)
  run(${CXX} -std=c++17 -I${WORK_DIR}/vendor -I${EIGEN_INC} ${consumer}/main.cpp -o ${WORK_DIR}/consumer)
  run(${WORK_DIR}/consumer)
  return()
elseif(MODE STREQUAL "pkg_config")
  # Installed to a prefix that is not the configured one: the .pc file must find its prefix
  # from where it lies. No CMake on the consumer side: pkg-config's flags and a compiler.
  find_program(PKG_CONFIG NAMES pkg-config pkgconf REQUIRED)
  run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${WORK_DIR}/prefix)
  set(ENV{PKG_CONFIG_PATH} ${WORK_DIR}/prefix/share/pkgconfig)
  execute_process(COMMAND ${PKG_CONFIG} --modversion moereg OUTPUT_VARIABLE ver OUTPUT_STRIP_TRAILING_WHITESPACE
                  RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0 OR NOT ver MATCHES "^0\\.1\\.")
    message(FATAL_ERROR "pkg-config --modversion moereg gave '${ver}' (rc ${rc})")
  endif()
  execute_process(COMMAND ${PKG_CONFIG} --cflags moereg OUTPUT_VARIABLE cflags OUTPUT_STRIP_TRAILING_WHITESPACE
                  RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0 OR NOT cflags MATCHES "${WORK_DIR}/prefix")
    message(FATAL_ERROR "pkg-config --cflags moereg gave '${cflags}' (rc ${rc}), not the install prefix")
  endif()
  separate_arguments(cflags UNIX_COMMAND "${cflags}")
  run(${CXX} ${cflags} ${consumer}/main.cpp -o ${WORK_DIR}/consumer)
  run(${WORK_DIR}/consumer)
  return()
else()
  message(FATAL_ERROR "unknown MODE ${MODE}")
endif()
run(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
run(${WORK_DIR}/build/consumer)
if(EXISTS ${WORK_DIR}/build/consumer_openmp)
  run(${WORK_DIR}/build/consumer_openmp)
endif()
if(COMPILED)
  run(${WORK_DIR}/build/consumer_compiled)
endif()
