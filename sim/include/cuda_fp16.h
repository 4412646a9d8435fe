// Simulated device: fp16 types and conversions live in sim/glimpse_sim.h (force-included).
#pragma once
