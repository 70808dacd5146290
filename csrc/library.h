// The operator library the kernels register under: `fastkd`; for the CPU stand-in (FASTKD_STANDIN, see
// device.cuh) `fastkd_standin` unless its build names another, so that it never collides with the real
// extension (or another stand-in build) in one process.
#pragma once

#ifndef FASTKD_LIBRARY
#ifdef FASTKD_STANDIN
#define FASTKD_LIBRARY fastkd_standin
#else
#define FASTKD_LIBRARY fastkd
#endif
#endif
