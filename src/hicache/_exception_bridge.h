// Translates C++ exceptions from the tree core into hicache's Python error classes. Used as the
// Cython `except +translate_cpp_exception` handler; it runs inside the catch block with the GIL.
#pragma once

#include <Python.h>

#include <stdexcept>

static PyObject* hicache_invalid_argument_error = nullptr;
static PyObject* hicache_index_error = nullptr;
static PyObject* hicache_invariant_error = nullptr;

static inline void set_hicache_error_types(PyObject* invalid, PyObject* index, PyObject* invariant) {
  Py_XINCREF(invalid);
  Py_XINCREF(index);
  Py_XINCREF(invariant);
  hicache_invalid_argument_error = invalid;
  hicache_index_error = index;
  hicache_invariant_error = invariant;
}

static inline void translate_cpp_exception() {
  try {
    throw;
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(hicache_invalid_argument_error, e.what());
  } catch (const std::out_of_range& e) {
    PyErr_SetString(hicache_index_error, e.what());
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(hicache_invariant_error, e.what());
  } catch (...) {
    PyErr_SetString(hicache_invariant_error, "unknown C++ exception in the hicache tree core");
  }
}
