"""Type stub for the compiled data plane (src/_dataplane.pyx)."""

class Dataplane:
    workers: int
    pipe_size: int
    def __init__(
        self,
        workers: int = 1,
        *,
        max_services: int = 65536,
        max_slots: int = 262144,
        pipe_size: int = 65536,
        max_pipes: int = 0,
        inactive_timeout: float = 120.0,
        reset_inactive_timeout: float = 10.0,
        splice: bool = True,
    ) -> None: ...
    def run_worker(self, index: int) -> None: ...
    def add_listener(self, worker: int, svc_id: int, fd: int) -> None: ...
    def remove_listeners(self, svc_id: int) -> None: ...
    def reset_slot(self, slot_id: int) -> None: ...
    def drain(self) -> None: ...
    def stop(self) -> None: ...
    def service_configure(
        self,
        svc_id: int,
        scheduler: str,
        *,
        flags: int = 0,
        persist_timeout: float = 0.0,
        netmask4: int = 32,
        netmask6: int = 128,
        expire_quiescent: bool = False,
        connect_timeout: float = 3.0,
        idle_timeout: float = 900.0,
        retries: int = -1,
    ) -> None: ...
    def service_clear(self, svc_id: int) -> None: ...
    def dest_add(
        self,
        svc_id: int,
        slot_id: int,
        host: str,
        port: int,
        weight: int,
        upper: int = 0,
        lower: int = 0,
    ) -> None: ...
    def dest_edit(
        self, svc_id: int, slot_id: int, weight: int, upper: int = 0, lower: int = 0
    ) -> None: ...
    def dest_del(self, svc_id: int, slot_id: int) -> None: ...
    def dest_order(self, svc_id: int) -> list[int]: ...
    def service_stats(self, svc_id: int) -> tuple[int, int, int, int, int]: ...
    def slot_stats(self, slot_id: int) -> tuple[int, int, int, int, int, int, int, int]: ...
    def slot_overloaded(self, svc_id: int, slot_id: int) -> bool: ...
    def worker_stats(self) -> tuple[int, int, int, int, int]: ...
