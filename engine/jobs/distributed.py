"""torch.distributed for the jobs: rank, world, the device of a rank and the few collectives they need.

Under ``torchrun`` (``WORLD_SIZE > 1``) a job shards its units of work over the ranks; one
process (``WORLD_SIZE`` unset) runs everything and no process group is made. The collectives
run over gloo (also on GPUs: they carry only barriers, short status messages and, for the
chaos job, the members' results), so a job on the CPU and one on GPUs synchronise the same way.

A rank that fails hands its error to the next collective instead of leaving the others waiting
there: :meth:`Dist.agree` and :meth:`Dist.gather` make every rank raise (the failed one its own
error, the others :class:`RankFailed`), so the job ends everywhere with one line naming the rank.
A rank that dies (SIGKILL) is torchrun's to notice: it stops the others. The jobs' two recurring
shapes are helpers: :meth:`Dist.create_then_open` (rank 0 lays a file out, all agree, the others
open it) and :meth:`Dist.together` (a block whose failure on one rank ends it on all).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import torch

from ..errors import EngineError

T = TypeVar("T")


class RankFailed(EngineError):
    """Another rank of the job failed (its error is in the message); raised on the ranks that did not."""


class Dist:
    """Rank, world and the collectives of a job (gloo; every method is a no-op for one process).

    The process group is created here when the launcher has not made one, and destroyed again
    by :meth:`close` (or on leaving a ``with Dist() as d:`` block). ``failed`` becomes True once a
    collective raised: after that no rank may call another collective (the peers are gone or are
    raising too).
    """

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = self.launched_rank()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.failed = False
        self._owned = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                hours = float(os.environ.get("ENTK_DIST_TIMEOUT_H", "48"))
                dist.init_process_group("gloo", timeout=timedelta(hours=hours))
                self._owned = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @staticmethod
    def launched_rank() -> int:
        """This process's rank as the launcher set it (``RANK``; 0 without torchrun), read without
        making a process group: for front ends that only decide who prints."""
        return int(os.environ.get("RANK", "0"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owns(self, k: int) -> bool:
        """Whether unit ``k`` of a job is this rank's: unit k goes to rank ``k % world``."""
        return k % self.world == self.rank

    @staticmethod
    def _message(error: BaseException | None) -> str | None:
        return None if error is None else f"{type(error).__name__}: {error}"

    def _raise_failures(self, error: BaseException | None, bad: tuple[int, str] | None) -> None:
        """After a collective: this rank's own error first, else the first failed rank's."""
        if error is not None:
            self.failed = True
            raise error
        if bad is not None:
            self.failed = True
            raise RankFailed(f"rank {bad[0]} failed ({bad[1]})")

    def agree(self, error: BaseException | None = None) -> None:
        """Barrier; if any rank failed, every rank raises (the failed one its own error)."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        msgs: list = [None] * self.world
        try:
            dist.all_gather_object(msgs, self._message(error))
        except BaseException:
            self.failed = True
            raise
        self._raise_failures(error, next(((r, m) for r, m in enumerate(msgs) if m), None))

    def gather(self, obj: Any, error: BaseException | None = None) -> list | None:
        """Every rank's ``obj`` to rank 0 (a list in rank order; None on the other ranks).

        Also a barrier with :meth:`agree`'s failure rule: a rank passing ``error`` sends that instead
        of an object, and then every rank raises.
        """
        if self.world == 1:
            if error is not None:
                raise error
            return [obj]
        import torch.distributed as dist

        got: list | None = [None] * self.world if self.main else None
        status: list = [None]
        try:
            dist.gather_object((self._message(error), None if error is not None else obj), got, dst=0)
            if self.main:
                status[0] = next(((r, m) for r, (m, _) in enumerate(got) if m), None)
            dist.broadcast_object_list(status, src=0)
        except BaseException:
            self.failed = True
            raise
        self._raise_failures(error, status[0])
        return [o for _, o in got] if self.main else None

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj``, on every rank (a list in rank order)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world
        try:
            dist.all_gather_object(out, obj)
        except BaseException:
            self.failed = True
            raise
        return out

    def create_then_open(self, create: Callable[[], T], open_existing: Callable[[], T]) -> T:
        """Rank 0 runs ``create`` (a file's whole layout, or a resume of it); once every rank has
        agreed it succeeded, the other ranks run ``open_existing`` (which checks the file holds their job too),
        and all agree again. Returns what this rank's call returned; one process just creates.
        A failure on any rank raises on every rank (:meth:`agree`)."""
        if self.world == 1:
            return create()
        got, err = None, None
        if self.main:
            try:
                got = create()
            except Exception as e:
                err = e
        self.agree(err)
        if not self.main:
            try:
                got = open_existing()
            except Exception as e:
                err = e
        self.agree(err)
        return got

    @contextlib.contextmanager
    def together(self, *, gather: bool = False) -> Iterator[None]:
        """A block that ends in a barrier every rank reaches, failed or not.

        An error inside the block is handed to the closing collective instead of being raised at
        once (which would leave the other ranks waiting there): every rank then raises, the failed one
        its own error. One process, a KeyboardInterrupt, or an error raised by a collective inside the
        block (the peers are gone or raising too) propagates at once. The closing collective is
        :meth:`agree`, or with ``gather`` :meth:`gather` (for blocks whose ranks meet in gathers, so
        that a failed rank's last call matches the one its peers wait in).
        """
        err = None
        try:
            yield
        except (Exception, KeyboardInterrupt) as e:
            if self.world == 1 or isinstance(e, (KeyboardInterrupt, RankFailed)) or self.failed:
                raise
            err = e
        if gather:
            self.gather(None, err)
        else:
            self.agree(err)

    def close(self, clean: bool = True) -> None:
        """Destroy the process group this object made. After a clean run (``clean`` and no failed
        collective) every rank first meets the others in a barrier, so that no rank tears its
        connections down, or exits, while a peer may still be using them. After an error no barrier:
        the peers may be waiting in another collective, which a barrier would not match."""
        if self._owned:
            import torch.distributed as dist

            try:
                if clean and not self.failed:
                    dist.barrier()
            finally:
                dist.destroy_process_group()
                self._owned = False

    def __enter__(self) -> Dist:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(clean=exc_type is None)


def rank_device(device: str | torch.device | None, d: Dist) -> torch.device:
    """``device`` resolved (``auto``: CUDA when available); a bare ``cuda`` under torchrun is ``cuda:LOCAL_RANK``."""
    from ..determinism import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and d.world > 1 and dev.index is None:
        dev = torch.device("cuda", d.local_rank % max(torch.cuda.device_count(), 1))
    return dev


__all__ = ["Dist", "RankFailed", "rank_device"]
