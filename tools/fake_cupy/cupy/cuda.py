"""cupy.cuda stand-in: one device of compute capability 9.0, streams that do nothing."""

import contextlib

from . import _MemoryPool as MemoryPool  # noqa: F401


class _Runtime:
    @staticmethod
    def getDeviceCount():
        return 1

    @staticmethod
    def getDevice():
        return 0

    @staticmethod
    def runtimeGetVersion():
        return 13000

    cudaDevAttrMaxSharedMemoryPerBlockOptin = 97

    @staticmethod
    def deviceGetAttribute(attrib, device):
        if attrib == 97:  # an H100's 227 KiB
            return 232448
        raise NotImplementedError(f"fake cupy: no device attribute {attrib}")

    @staticmethod
    def getDeviceProperties(device):
        return {"name": b"fake CuPy (NumPy on the CPU)", "totalGlobalMem": 0,
                "multiProcessorCount": 0}


runtime = _Runtime()


class Device:
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        self.compute_capability = "90"

    def use(self):
        return self

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Event:
    def __init__(self, *a, **k):
        import time
        self._t = time.perf_counter

    def record(self, stream=None):
        self.t = self._t()

    def synchronize(self):
        pass


def get_elapsed_time(start, stop):
    return (stop.t - start.t) * 1e3


class Stream:
    null = None

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.ptr = 0

    def synchronize(self):
        pass

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def record(self, event=None):
        event = Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event):
        pass

    def begin_capture(self, mode=None):
        raise NotImplementedError("fake cupy: no CUDA graphs without a GPU")

    def is_capturing(self):
        return False


Stream.null = Stream()


def get_current_stream(device=None):
    return Stream.null


@contextlib.contextmanager
def using_allocator(allocator=None):
    yield
