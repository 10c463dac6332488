// Corral's public C++ API in one include: the engine (requests in, tokens out), the model and
// its configuration, devices, and the error classes every call may throw.
#pragma once

#include "corral/config.h"
#include "corral/device.h"
#include "corral/engine.h"
#include "corral/error.h"
#include "corral/model.h"
