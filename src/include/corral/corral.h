// Corral's public C++ API in one include: the engine (token ids in, token ids out), the engine
// thread for services, the error classes every call may throw, and the version.
#pragma once

#include "corral/async_engine.h"
#include "corral/engine.h"
#include "corral/error.h"
#include "corral/version.h"
