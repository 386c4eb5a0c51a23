// parallel_for for the CPU kernels: at::parallel_for's contract (fn(b, e) over
// subranges that cover [begin, end), each at least `grain` long but the last),
// on a pool of its own whose calling thread never waits for a worker that has
// not started.
//
// Why not OpenMP: at the end of an OpenMP region the calling thread waits at a
// barrier for every thread of the team, and a worker that slept since the last
// region must first be scheduled. On a core another process wants, that took
// milliseconds for a region of microseconds (beside two busy processes on 2
// cores, a guided step of the tiny layout spent most of its time so). Here the
// work is claimed in chunks from a shared counter: the caller takes chunks
// until none is left, and waits only for chunks a worker has claimed (which
// it is running); a worker that wakes after the last chunk was claimed finds
// nothing and sleeps again. Idle, the workers claim their share as OpenMP's
// would have run it.
//
// The threads: at::get_num_threads() in all, the caller one of them (the same
// count torch's own operators use). Serial when that is 1, when the range is
// at most `grain`, inside a task of this pool, inside an ATen parallel region,
// or while another thread is using the pool. A chunk's result must not depend
// on which thread runs it (no thread index is given), so the bytes do not
// depend on the schedule. ADM_FAST_CPU_POOL=0 runs them on OpenMP's regions
// (at::parallel_for) instead, the same bytes.
#pragma once

#include <c10/util/FunctionRef.h>

#include <cstdint>

namespace adm_fast_cpu {

void parallel_for(int64_t begin, int64_t end, int64_t grain,
                  c10::function_ref<void(int64_t, int64_t)> fn);

}  // namespace adm_fast_cpu
