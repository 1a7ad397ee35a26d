from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GpuHealth(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GPU_HEALTH_UNSPECIFIED: _ClassVar[GpuHealth]
    GPU_HEALTH_OK: _ClassVar[GpuHealth]
    GPU_HEALTH_LOST: _ClassVar[GpuHealth]
    GPU_HEALTH_ERROR: _ClassVar[GpuHealth]

class ProcessListState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROCESS_LIST_UNSPECIFIED: _ClassVar[ProcessListState]
    PROCESS_LIST_OK: _ClassVar[ProcessListState]
    PROCESS_LIST_UNRELIABLE: _ClassVar[ProcessListState]
    PROCESS_LIST_UNKNOWN: _ClassVar[ProcessListState]

class CommandStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMAND_STATUS_UNSPECIFIED: _ClassVar[CommandStatus]
    COMMAND_STATUS_DONE: _ClassVar[CommandStatus]
    COMMAND_STATUS_REFUSED: _ClassVar[CommandStatus]
    COMMAND_STATUS_FAILED: _ClassVar[CommandStatus]
GPU_HEALTH_UNSPECIFIED: GpuHealth
GPU_HEALTH_OK: GpuHealth
GPU_HEALTH_LOST: GpuHealth
GPU_HEALTH_ERROR: GpuHealth
PROCESS_LIST_UNSPECIFIED: ProcessListState
PROCESS_LIST_OK: ProcessListState
PROCESS_LIST_UNRELIABLE: ProcessListState
PROCESS_LIST_UNKNOWN: ProcessListState
COMMAND_STATUS_UNSPECIFIED: CommandStatus
COMMAND_STATUS_DONE: CommandStatus
COMMAND_STATUS_REFUSED: CommandStatus
COMMAND_STATUS_FAILED: CommandStatus

class AgentMessage(_message.Message):
    __slots__ = ("hello", "telemetry", "command_ack", "command_result", "heartbeat", "notice", "job_update", "kernel_report")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ACK_FIELD_NUMBER: _ClassVar[int]
    COMMAND_RESULT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    JOB_UPDATE_FIELD_NUMBER: _ClassVar[int]
    KERNEL_REPORT_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    telemetry: TelemetryBatch
    command_ack: CommandAck
    command_result: CommandResult
    heartbeat: Heartbeat
    notice: PreemptionNoticeReport
    job_update: JobUpdate
    kernel_report: KernelReport
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., telemetry: _Optional[_Union[TelemetryBatch, _Mapping]] = ..., command_ack: _Optional[_Union[CommandAck, _Mapping]] = ..., command_result: _Optional[_Union[CommandResult, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., notice: _Optional[_Union[PreemptionNoticeReport, _Mapping]] = ..., job_update: _Optional[_Union[JobUpdate, _Mapping]] = ..., kernel_report: _Optional[_Union[KernelReport, _Mapping]] = ...) -> None: ...

class BrokerMessage(_message.Message):
    __slots__ = ("welcome", "refusal", "command", "batch_ack", "kernel_report_ack")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    BATCH_ACK_FIELD_NUMBER: _ClassVar[int]
    KERNEL_REPORT_ACK_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    refusal: Refusal
    command: Command
    batch_ack: BatchAck
    kernel_report_ack: KernelReportAck
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., refusal: _Optional[_Union[Refusal, _Mapping]] = ..., command: _Optional[_Union[Command, _Mapping]] = ..., batch_ack: _Optional[_Union[BatchAck, _Mapping]] = ..., kernel_report_ack: _Optional[_Union[KernelReportAck, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("agent_version", "protocol_version", "host", "gpus", "labels", "sent_at_s", "kernel_fingerprints")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_S_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    protocol_version: int
    host: HostIdentity
    gpus: _containers.RepeatedCompositeFieldContainer[GpuInfo]
    labels: _containers.ScalarMap[str, str]
    sent_at_s: float
    kernel_fingerprints: _containers.RepeatedCompositeFieldContainer[KernelFingerprint]
    def __init__(self, agent_version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., host: _Optional[_Union[HostIdentity, _Mapping]] = ..., gpus: _Optional[_Iterable[_Union[GpuInfo, _Mapping]]] = ..., labels: _Optional[_Mapping[str, str]] = ..., sent_at_s: _Optional[float] = ..., kernel_fingerprints: _Optional[_Iterable[_Union[KernelFingerprint, _Mapping]]] = ...) -> None: ...

class HostIdentity(_message.Message):
    __slots__ = ("host_id", "hostname", "provider", "region", "zone", "instance_id", "instance_type", "spot", "project")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    SPOT_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    hostname: str
    provider: str
    region: str
    zone: str
    instance_id: str
    instance_type: str
    spot: bool
    project: str
    def __init__(self, host_id: _Optional[str] = ..., hostname: _Optional[str] = ..., provider: _Optional[str] = ..., region: _Optional[str] = ..., zone: _Optional[str] = ..., instance_id: _Optional[str] = ..., instance_type: _Optional[str] = ..., spot: _Optional[bool] = ..., project: _Optional[str] = ...) -> None: ...

class GpuInfo(_message.Message):
    __slots__ = ("uuid", "index", "name", "vendor", "pci_bus_id", "driver_version", "compute_capability", "mem_total_bytes", "sm_activity_supported")
    UUID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VENDOR_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SM_ACTIVITY_SUPPORTED_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    index: int
    name: str
    vendor: str
    pci_bus_id: str
    driver_version: str
    compute_capability: str
    mem_total_bytes: int
    sm_activity_supported: bool
    def __init__(self, uuid: _Optional[str] = ..., index: _Optional[int] = ..., name: _Optional[str] = ..., vendor: _Optional[str] = ..., pci_bus_id: _Optional[str] = ..., driver_version: _Optional[str] = ..., compute_capability: _Optional[str] = ..., mem_total_bytes: _Optional[int] = ..., sm_activity_supported: _Optional[bool] = ...) -> None: ...

class GpuProcess(_message.Message):
    __slots__ = ("pid", "used_mem_bytes", "name")
    PID_FIELD_NUMBER: _ClassVar[int]
    USED_MEM_BYTES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    pid: int
    used_mem_bytes: int
    name: str
    def __init__(self, pid: _Optional[int] = ..., used_mem_bytes: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class GpuSample(_message.Message):
    __slots__ = ("gpu_uuid", "timestamp_s", "health", "health_detail", "util_ratio", "sm_active_ratio", "mem_util_ratio", "mem_used_bytes", "mem_total_bytes", "power_w", "temperature_c", "sm_clock_hz", "process_state", "processes", "process_detail")
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    HEALTH_DETAIL_FIELD_NUMBER: _ClassVar[int]
    UTIL_RATIO_FIELD_NUMBER: _ClassVar[int]
    SM_ACTIVE_RATIO_FIELD_NUMBER: _ClassVar[int]
    MEM_UTIL_RATIO_FIELD_NUMBER: _ClassVar[int]
    MEM_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_HZ_FIELD_NUMBER: _ClassVar[int]
    PROCESS_STATE_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    PROCESS_DETAIL_FIELD_NUMBER: _ClassVar[int]
    gpu_uuid: str
    timestamp_s: float
    health: GpuHealth
    health_detail: str
    util_ratio: float
    sm_active_ratio: float
    mem_util_ratio: float
    mem_used_bytes: int
    mem_total_bytes: int
    power_w: float
    temperature_c: float
    sm_clock_hz: float
    process_state: ProcessListState
    processes: _containers.RepeatedCompositeFieldContainer[GpuProcess]
    process_detail: str
    def __init__(self, gpu_uuid: _Optional[str] = ..., timestamp_s: _Optional[float] = ..., health: _Optional[_Union[GpuHealth, str]] = ..., health_detail: _Optional[str] = ..., util_ratio: _Optional[float] = ..., sm_active_ratio: _Optional[float] = ..., mem_util_ratio: _Optional[float] = ..., mem_used_bytes: _Optional[int] = ..., mem_total_bytes: _Optional[int] = ..., power_w: _Optional[float] = ..., temperature_c: _Optional[float] = ..., sm_clock_hz: _Optional[float] = ..., process_state: _Optional[_Union[ProcessListState, str]] = ..., processes: _Optional[_Iterable[_Union[GpuProcess, _Mapping]]] = ..., process_detail: _Optional[str] = ...) -> None: ...

class TelemetryBatch(_message.Message):
    __slots__ = ("batch_id", "samples", "dropped_samples_total")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_SAMPLES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    samples: _containers.RepeatedCompositeFieldContainer[GpuSample]
    dropped_samples_total: int
    def __init__(self, batch_id: _Optional[int] = ..., samples: _Optional[_Iterable[_Union[GpuSample, _Mapping]]] = ..., dropped_samples_total: _Optional[int] = ...) -> None: ...

class BatchAck(_message.Message):
    __slots__ = ("batch_id",)
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    def __init__(self, batch_id: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_at_s",)
    SENT_AT_S_FIELD_NUMBER: _ClassVar[int]
    sent_at_s: float
    def __init__(self, sent_at_s: _Optional[float] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("protocol_version", "host_id", "heartbeat_interval_s")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    host_id: str
    heartbeat_interval_s: float
    def __init__(self, protocol_version: _Optional[int] = ..., host_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("reason", "supported_protocol_versions", "broker_version")
    REASON_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_PROTOCOL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    BROKER_VERSION_FIELD_NUMBER: _ClassVar[int]
    reason: str
    supported_protocol_versions: _containers.RepeatedScalarFieldContainer[int]
    broker_version: str
    def __init__(self, reason: _Optional[str] = ..., supported_protocol_versions: _Optional[_Iterable[int]] = ..., broker_version: _Optional[str] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("command_id", "issued_at_s", "kill_processes", "start_job", "checkpoint_job", "stop_job", "install_kernels", "evict_kernels")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_S_FIELD_NUMBER: _ClassVar[int]
    KILL_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    START_JOB_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_JOB_FIELD_NUMBER: _ClassVar[int]
    STOP_JOB_FIELD_NUMBER: _ClassVar[int]
    INSTALL_KERNELS_FIELD_NUMBER: _ClassVar[int]
    EVICT_KERNELS_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    issued_at_s: float
    kill_processes: KillProcesses
    start_job: StartJob
    checkpoint_job: CheckpointJob
    stop_job: StopJob
    install_kernels: InstallKernels
    evict_kernels: EvictKernels
    def __init__(self, command_id: _Optional[str] = ..., issued_at_s: _Optional[float] = ..., kill_processes: _Optional[_Union[KillProcesses, _Mapping]] = ..., start_job: _Optional[_Union[StartJob, _Mapping]] = ..., checkpoint_job: _Optional[_Union[CheckpointJob, _Mapping]] = ..., stop_job: _Optional[_Union[StopJob, _Mapping]] = ..., install_kernels: _Optional[_Union[InstallKernels, _Mapping]] = ..., evict_kernels: _Optional[_Union[EvictKernels, _Mapping]] = ...) -> None: ...

class PreemptionNoticeReport(_message.Message):
    __slots__ = ("provider", "kind", "action", "key", "deadline_s", "detected_at_s", "evacuate", "detail", "raw_json")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    DETECTED_AT_S_FIELD_NUMBER: _ClassVar[int]
    EVACUATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    RAW_JSON_FIELD_NUMBER: _ClassVar[int]
    provider: str
    kind: str
    action: str
    key: str
    deadline_s: float
    detected_at_s: float
    evacuate: bool
    detail: str
    raw_json: str
    def __init__(self, provider: _Optional[str] = ..., kind: _Optional[str] = ..., action: _Optional[str] = ..., key: _Optional[str] = ..., deadline_s: _Optional[float] = ..., detected_at_s: _Optional[float] = ..., evacuate: _Optional[bool] = ..., detail: _Optional[str] = ..., raw_json: _Optional[str] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("name", "argv", "env", "gpus", "hardware", "labels", "checkpoint_url", "workdir", "policy", "deadline_s", "max_usd_per_hour", "work_hours", "accelerator")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_URL_FIELD_NUMBER: _ClassVar[int]
    WORKDIR_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    MAX_USD_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    WORK_HOURS_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    argv: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    gpus: int
    hardware: str
    labels: _containers.ScalarMap[str, str]
    checkpoint_url: str
    workdir: str
    policy: str
    deadline_s: float
    max_usd_per_hour: float
    work_hours: float
    accelerator: str
    def __init__(self, name: _Optional[str] = ..., argv: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., gpus: _Optional[int] = ..., hardware: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., checkpoint_url: _Optional[str] = ..., workdir: _Optional[str] = ..., policy: _Optional[str] = ..., deadline_s: _Optional[float] = ..., max_usd_per_hour: _Optional[float] = ..., work_hours: _Optional[float] = ..., accelerator: _Optional[str] = ...) -> None: ...

class StartJob(_message.Message):
    __slots__ = ("job_id", "spec", "gpu_uuids", "resume_from", "attempt")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    GPU_UUIDS_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: JobSpec
    gpu_uuids: _containers.RepeatedScalarFieldContainer[str]
    resume_from: str
    attempt: int
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., gpu_uuids: _Optional[_Iterable[str]] = ..., resume_from: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class CheckpointJob(_message.Message):
    __slots__ = ("job_id", "deadline_s", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    deadline_s: float
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., deadline_s: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class StopJob(_message.Message):
    __slots__ = ("job_id", "term_timeout_s", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TERM_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    term_timeout_s: float
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., term_timeout_s: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class JobUpdate(_message.Message):
    __slots__ = ("job_id", "attempt", "state", "at_s", "step", "checkpoint_url", "checkpoint_step", "exit_code", "detail", "log_tail", "event")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    AT_S_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_URL_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    LOG_TAIL_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    state: str
    at_s: float
    step: int
    checkpoint_url: str
    checkpoint_step: int
    exit_code: int
    detail: str
    log_tail: str
    event: str
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., state: _Optional[str] = ..., at_s: _Optional[float] = ..., step: _Optional[int] = ..., checkpoint_url: _Optional[str] = ..., checkpoint_step: _Optional[int] = ..., exit_code: _Optional[int] = ..., detail: _Optional[str] = ..., log_tail: _Optional[str] = ..., event: _Optional[str] = ...) -> None: ...

class KillProcesses(_message.Message):
    __slots__ = ("gpu_uuid", "pids", "term_timeout_s", "max_activity_ratio", "protected_process_names", "reason")
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    TERM_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVITY_RATIO_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_PROCESS_NAMES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    gpu_uuid: str
    pids: _containers.RepeatedScalarFieldContainer[int]
    term_timeout_s: float
    max_activity_ratio: float
    protected_process_names: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    def __init__(self, gpu_uuid: _Optional[str] = ..., pids: _Optional[_Iterable[int]] = ..., term_timeout_s: _Optional[float] = ..., max_activity_ratio: _Optional[float] = ..., protected_process_names: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ...) -> None: ...

class CommandAck(_message.Message):
    __slots__ = ("command_id",)
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    def __init__(self, command_id: _Optional[str] = ...) -> None: ...

class CommandResult(_message.Message):
    __slots__ = ("command_id", "status", "detail", "terminated_pids", "killed_pids")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    TERMINATED_PIDS_FIELD_NUMBER: _ClassVar[int]
    KILLED_PIDS_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    status: CommandStatus
    detail: str
    terminated_pids: _containers.RepeatedScalarFieldContainer[int]
    killed_pids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, command_id: _Optional[str] = ..., status: _Optional[_Union[CommandStatus, str]] = ..., detail: _Optional[str] = ..., terminated_pids: _Optional[_Iterable[int]] = ..., killed_pids: _Optional[_Iterable[int]] = ...) -> None: ...

class Offer(_message.Message):
    __slots__ = ("provider", "region", "zone", "instance_type", "lifecycle", "usd_per_hour", "gpus", "accelerator", "interruption_band", "hourly_risk", "source", "observed_at_s", "score")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    LIFECYCLE_FIELD_NUMBER: _ClassVar[int]
    USD_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    INTERRUPTION_BAND_FIELD_NUMBER: _ClassVar[int]
    HOURLY_RISK_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_AT_S_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    provider: str
    region: str
    zone: str
    instance_type: str
    lifecycle: str
    usd_per_hour: float
    gpus: int
    accelerator: str
    interruption_band: str
    hourly_risk: float
    source: str
    observed_at_s: float
    score: float
    def __init__(self, provider: _Optional[str] = ..., region: _Optional[str] = ..., zone: _Optional[str] = ..., instance_type: _Optional[str] = ..., lifecycle: _Optional[str] = ..., usd_per_hour: _Optional[float] = ..., gpus: _Optional[int] = ..., accelerator: _Optional[str] = ..., interruption_band: _Optional[str] = ..., hourly_risk: _Optional[float] = ..., source: _Optional[str] = ..., observed_at_s: _Optional[float] = ..., score: _Optional[float] = ...) -> None: ...

class ListOffersRequest(_message.Message):
    __slots__ = ("provider", "region", "instance_type", "lifecycle", "limit", "refresh", "accelerator")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    LIFECYCLE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REFRESH_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    provider: str
    region: str
    instance_type: str
    lifecycle: str
    limit: int
    refresh: bool
    accelerator: str
    def __init__(self, provider: _Optional[str] = ..., region: _Optional[str] = ..., instance_type: _Optional[str] = ..., lifecycle: _Optional[str] = ..., limit: _Optional[int] = ..., refresh: _Optional[bool] = ..., accelerator: _Optional[str] = ...) -> None: ...

class ListOffersResponse(_message.Message):
    __slots__ = ("offers", "refreshed_at_s", "age_s", "stale", "stale_after_s", "warnings", "total")
    OFFERS_FIELD_NUMBER: _ClassVar[int]
    REFRESHED_AT_S_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    STALE_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    offers: _containers.RepeatedCompositeFieldContainer[Offer]
    refreshed_at_s: float
    age_s: float
    stale: bool
    stale_after_s: float
    warnings: _containers.RepeatedScalarFieldContainer[str]
    total: int
    def __init__(self, offers: _Optional[_Iterable[_Union[Offer, _Mapping]]] = ..., refreshed_at_s: _Optional[float] = ..., age_s: _Optional[float] = ..., stale: _Optional[bool] = ..., stale_after_s: _Optional[float] = ..., warnings: _Optional[_Iterable[str]] = ..., total: _Optional[int] = ...) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ("include_released",)
    INCLUDE_RELEASED_FIELD_NUMBER: _ClassVar[int]
    include_released: bool
    def __init__(self, include_released: _Optional[bool] = ...) -> None: ...

class LaunchedInstance(_message.Message):
    __slots__ = ("instance_id", "provider", "region", "zone", "instance_type", "lifecycle", "usd_per_hour", "state", "job_id", "host_id", "launched_at_s", "updated_at_s", "detail", "project", "launch_id", "name")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    LIFECYCLE_FIELD_NUMBER: _ClassVar[int]
    USD_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    LAUNCHED_AT_S_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_S_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    LAUNCH_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    provider: str
    region: str
    zone: str
    instance_type: str
    lifecycle: str
    usd_per_hour: float
    state: str
    job_id: str
    host_id: str
    launched_at_s: float
    updated_at_s: float
    detail: str
    project: str
    launch_id: str
    name: str
    def __init__(self, instance_id: _Optional[str] = ..., provider: _Optional[str] = ..., region: _Optional[str] = ..., zone: _Optional[str] = ..., instance_type: _Optional[str] = ..., lifecycle: _Optional[str] = ..., usd_per_hour: _Optional[float] = ..., state: _Optional[str] = ..., job_id: _Optional[str] = ..., host_id: _Optional[str] = ..., launched_at_s: _Optional[float] = ..., updated_at_s: _Optional[float] = ..., detail: _Optional[str] = ..., project: _Optional[str] = ..., launch_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[LaunchedInstance]
    def __init__(self, instances: _Optional[_Iterable[_Union[LaunchedInstance, _Mapping]]] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: str
    def __init__(self, state: _Optional[str] = ...) -> None: ...

class JobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class MigrateJobRequest(_message.Message):
    __slots__ = ("job_id", "to_host_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TO_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    to_host_id: str
    def __init__(self, job_id: _Optional[str] = ..., to_host_id: _Optional[str] = ...) -> None: ...

class JobHistoryLine(_message.Message):
    __slots__ = ("at_s", "kind", "detail")
    AT_S_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    at_s: float
    kind: str
    detail: str
    def __init__(self, at_s: _Optional[float] = ..., kind: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class JobView(_message.Message):
    __slots__ = ("job_id", "spec", "state", "host_id", "gpu_uuids", "step", "checkpoint_url", "checkpoint_step", "attempt", "created_at_s", "updated_at_s", "history", "steps_lost", "log_tail", "detail", "run_seconds", "lifecycle", "cost_usd")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_UUIDS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_URL_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_S_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_S_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    STEPS_LOST_FIELD_NUMBER: _ClassVar[int]
    LOG_TAIL_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    RUN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LIFECYCLE_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: JobSpec
    state: str
    host_id: str
    gpu_uuids: _containers.RepeatedScalarFieldContainer[str]
    step: int
    checkpoint_url: str
    checkpoint_step: int
    attempt: int
    created_at_s: float
    updated_at_s: float
    history: _containers.RepeatedCompositeFieldContainer[JobHistoryLine]
    steps_lost: int
    log_tail: str
    detail: str
    run_seconds: float
    lifecycle: str
    cost_usd: float
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[str] = ..., host_id: _Optional[str] = ..., gpu_uuids: _Optional[_Iterable[str]] = ..., step: _Optional[int] = ..., checkpoint_url: _Optional[str] = ..., checkpoint_step: _Optional[int] = ..., attempt: _Optional[int] = ..., created_at_s: _Optional[float] = ..., updated_at_s: _Optional[float] = ..., history: _Optional[_Iterable[_Union[JobHistoryLine, _Mapping]]] = ..., steps_lost: _Optional[int] = ..., log_tail: _Optional[str] = ..., detail: _Optional[str] = ..., run_seconds: _Optional[float] = ..., lifecycle: _Optional[str] = ..., cost_usd: _Optional[float] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobView]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobView, _Mapping]]] = ...) -> None: ...

class ListHostsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HostView(_message.Message):
    __slots__ = ("identity", "status", "last_seen_s", "agent_version", "labels", "gpu_count", "dropped_samples_total", "policy_group", "kernel_fingerprints")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_S_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_SAMPLES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    POLICY_GROUP_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    identity: HostIdentity
    status: str
    last_seen_s: float
    agent_version: str
    labels: _containers.ScalarMap[str, str]
    gpu_count: int
    dropped_samples_total: int
    policy_group: str
    kernel_fingerprints: _containers.RepeatedCompositeFieldContainer[KernelFingerprint]
    def __init__(self, identity: _Optional[_Union[HostIdentity, _Mapping]] = ..., status: _Optional[str] = ..., last_seen_s: _Optional[float] = ..., agent_version: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., gpu_count: _Optional[int] = ..., dropped_samples_total: _Optional[int] = ..., policy_group: _Optional[str] = ..., kernel_fingerprints: _Optional[_Iterable[_Union[KernelFingerprint, _Mapping]]] = ...) -> None: ...

class ListHostsResponse(_message.Message):
    __slots__ = ("hosts",)
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    hosts: _containers.RepeatedCompositeFieldContainer[HostView]
    def __init__(self, hosts: _Optional[_Iterable[_Union[HostView, _Mapping]]] = ...) -> None: ...

class ListGpusRequest(_message.Message):
    __slots__ = ("host_id",)
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    def __init__(self, host_id: _Optional[str] = ...) -> None: ...

class GpuView(_message.Message):
    __slots__ = ("host_id", "info", "last_sample", "idle", "idle_since_s")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    LAST_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    IDLE_SINCE_S_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    info: GpuInfo
    last_sample: GpuSample
    idle: bool
    idle_since_s: float
    def __init__(self, host_id: _Optional[str] = ..., info: _Optional[_Union[GpuInfo, _Mapping]] = ..., last_sample: _Optional[_Union[GpuSample, _Mapping]] = ..., idle: _Optional[bool] = ..., idle_since_s: _Optional[float] = ...) -> None: ...

class ListGpusResponse(_message.Message):
    __slots__ = ("gpus",)
    GPUS_FIELD_NUMBER: _ClassVar[int]
    gpus: _containers.RepeatedCompositeFieldContainer[GpuView]
    def __init__(self, gpus: _Optional[_Iterable[_Union[GpuView, _Mapping]]] = ...) -> None: ...

class ListIdleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class IdleView(_message.Message):
    __slots__ = ("host_id", "gpu_uuid", "idle_since_s", "idle_for_s", "action", "action_at_s", "reason", "policy_group", "processes", "dry_run")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    IDLE_SINCE_S_FIELD_NUMBER: _ClassVar[int]
    IDLE_FOR_S_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ACTION_AT_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_GROUP_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    gpu_uuid: str
    idle_since_s: float
    idle_for_s: float
    action: str
    action_at_s: float
    reason: str
    policy_group: str
    processes: _containers.RepeatedCompositeFieldContainer[GpuProcess]
    dry_run: bool
    def __init__(self, host_id: _Optional[str] = ..., gpu_uuid: _Optional[str] = ..., idle_since_s: _Optional[float] = ..., idle_for_s: _Optional[float] = ..., action: _Optional[str] = ..., action_at_s: _Optional[float] = ..., reason: _Optional[str] = ..., policy_group: _Optional[str] = ..., processes: _Optional[_Iterable[_Union[GpuProcess, _Mapping]]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ListIdleResponse(_message.Message):
    __slots__ = ("idle",)
    IDLE_FIELD_NUMBER: _ClassVar[int]
    idle: _containers.RepeatedCompositeFieldContainer[IdleView]
    def __init__(self, idle: _Optional[_Iterable[_Union[IdleView, _Mapping]]] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PolicyDocument(_message.Message):
    __slots__ = ("yaml", "applied_at_s")
    YAML_FIELD_NUMBER: _ClassVar[int]
    APPLIED_AT_S_FIELD_NUMBER: _ClassVar[int]
    yaml: str
    applied_at_s: float
    def __init__(self, yaml: _Optional[str] = ..., applied_at_s: _Optional[float] = ...) -> None: ...

class ApplyPolicyRequest(_message.Message):
    __slots__ = ("yaml", "dry_run")
    YAML_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    yaml: str
    dry_run: bool
    def __init__(self, yaml: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ApplyPolicyResponse(_message.Message):
    __slots__ = ("applied", "problems")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    problems: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, applied: _Optional[bool] = ..., problems: _Optional[_Iterable[str]] = ...) -> None: ...

class GetSavingsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ActionView(_message.Message):
    __slots__ = ("action_id", "host_id", "kind", "state", "started_at_s", "ended_at_s", "gpu_hours_saved", "money_saved_usd", "detail", "policy_group", "gpu_uuids", "dry_run")
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_S_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_S_FIELD_NUMBER: _ClassVar[int]
    GPU_HOURS_SAVED_FIELD_NUMBER: _ClassVar[int]
    MONEY_SAVED_USD_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    POLICY_GROUP_FIELD_NUMBER: _ClassVar[int]
    GPU_UUIDS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    host_id: str
    kind: str
    state: str
    started_at_s: float
    ended_at_s: float
    gpu_hours_saved: float
    money_saved_usd: float
    detail: str
    policy_group: str
    gpu_uuids: _containers.RepeatedScalarFieldContainer[str]
    dry_run: bool
    def __init__(self, action_id: _Optional[str] = ..., host_id: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[str] = ..., started_at_s: _Optional[float] = ..., ended_at_s: _Optional[float] = ..., gpu_hours_saved: _Optional[float] = ..., money_saved_usd: _Optional[float] = ..., detail: _Optional[str] = ..., policy_group: _Optional[str] = ..., gpu_uuids: _Optional[_Iterable[str]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class SavingsReport(_message.Message):
    __slots__ = ("gpu_hours_saved", "money_saved_usd", "actions_total", "actions", "gpu_hours_idle")
    GPU_HOURS_SAVED_FIELD_NUMBER: _ClassVar[int]
    MONEY_SAVED_USD_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    GPU_HOURS_IDLE_FIELD_NUMBER: _ClassVar[int]
    gpu_hours_saved: float
    money_saved_usd: float
    actions_total: int
    actions: _containers.RepeatedCompositeFieldContainer[ActionView]
    gpu_hours_idle: float
    def __init__(self, gpu_hours_saved: _Optional[float] = ..., money_saved_usd: _Optional[float] = ..., actions_total: _Optional[int] = ..., actions: _Optional[_Iterable[_Union[ActionView, _Mapping]]] = ..., gpu_hours_idle: _Optional[float] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("since_id", "limit", "kinds")
    SINCE_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    since_id: int
    limit: int
    kinds: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, since_id: _Optional[int] = ..., limit: _Optional[int] = ..., kinds: _Optional[_Iterable[str]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("id", "at_s", "kind", "host_id", "gpu_uuid", "cause", "data_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    AT_S_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    id: int
    at_s: float
    kind: str
    host_id: str
    gpu_uuid: str
    cause: str
    data_json: str
    def __init__(self, id: _Optional[int] = ..., at_s: _Optional[float] = ..., kind: _Optional[str] = ..., host_id: _Optional[str] = ..., gpu_uuid: _Optional[str] = ..., cause: _Optional[str] = ..., data_json: _Optional[str] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class KernelFingerprint(_message.Message):
    __slots__ = ("key", "vendor", "product", "compute_capability", "mem_total_gib", "driver_major", "runtime", "triton", "multiprocessors")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VENDOR_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_GIB_FIELD_NUMBER: _ClassVar[int]
    DRIVER_MAJOR_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    TRITON_FIELD_NUMBER: _ClassVar[int]
    MULTIPROCESSORS_FIELD_NUMBER: _ClassVar[int]
    key: str
    vendor: str
    product: str
    compute_capability: str
    mem_total_gib: int
    driver_major: str
    runtime: str
    triton: str
    multiprocessors: int
    def __init__(self, key: _Optional[str] = ..., vendor: _Optional[str] = ..., product: _Optional[str] = ..., compute_capability: _Optional[str] = ..., mem_total_gib: _Optional[int] = ..., driver_major: _Optional[str] = ..., runtime: _Optional[str] = ..., triton: _Optional[str] = ..., multiprocessors: _Optional[int] = ...) -> None: ...

class KernelEntry(_message.Message):
    __slots__ = ("slot_key", "kernel", "source_hash", "candidates_hash", "fingerprint", "tuning_key", "config", "winner_ms", "default_ms", "tuned_by", "tuned_at_s", "tune_seconds", "candidates_tried", "agreeing_hosts", "pinned")
    class ConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SLOT_KEY_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_HASH_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_HASH_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TUNING_KEY_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    WINNER_MS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MS_FIELD_NUMBER: _ClassVar[int]
    TUNED_BY_FIELD_NUMBER: _ClassVar[int]
    TUNED_AT_S_FIELD_NUMBER: _ClassVar[int]
    TUNE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_TRIED_FIELD_NUMBER: _ClassVar[int]
    AGREEING_HOSTS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    slot_key: str
    kernel: str
    source_hash: str
    candidates_hash: str
    fingerprint: KernelFingerprint
    tuning_key: str
    config: _containers.ScalarMap[str, int]
    winner_ms: float
    default_ms: float
    tuned_by: str
    tuned_at_s: float
    tune_seconds: float
    candidates_tried: int
    agreeing_hosts: int
    pinned: bool
    def __init__(self, slot_key: _Optional[str] = ..., kernel: _Optional[str] = ..., source_hash: _Optional[str] = ..., candidates_hash: _Optional[str] = ..., fingerprint: _Optional[_Union[KernelFingerprint, _Mapping]] = ..., tuning_key: _Optional[str] = ..., config: _Optional[_Mapping[str, int]] = ..., winner_ms: _Optional[float] = ..., default_ms: _Optional[float] = ..., tuned_by: _Optional[str] = ..., tuned_at_s: _Optional[float] = ..., tune_seconds: _Optional[float] = ..., candidates_tried: _Optional[int] = ..., agreeing_hosts: _Optional[int] = ..., pinned: _Optional[bool] = ...) -> None: ...

class KernelVerdict(_message.Message):
    __slots__ = ("slot_key", "config_hash", "tuned_by", "accepted", "reason", "entry_ms", "default_ms", "verified_at_s")
    SLOT_KEY_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    TUNED_BY_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ENTRY_MS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MS_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_AT_S_FIELD_NUMBER: _ClassVar[int]
    slot_key: str
    config_hash: str
    tuned_by: str
    accepted: bool
    reason: str
    entry_ms: float
    default_ms: float
    verified_at_s: float
    def __init__(self, slot_key: _Optional[str] = ..., config_hash: _Optional[str] = ..., tuned_by: _Optional[str] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., entry_ms: _Optional[float] = ..., default_ms: _Optional[float] = ..., verified_at_s: _Optional[float] = ...) -> None: ...

class KernelReport(_message.Message):
    __slots__ = ("report_id", "entries", "verdicts")
    REPORT_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    report_id: int
    entries: _containers.RepeatedCompositeFieldContainer[KernelEntry]
    verdicts: _containers.RepeatedCompositeFieldContainer[KernelVerdict]
    def __init__(self, report_id: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[KernelEntry, _Mapping]]] = ..., verdicts: _Optional[_Iterable[_Union[KernelVerdict, _Mapping]]] = ...) -> None: ...

class KernelReportAck(_message.Message):
    __slots__ = ("report_id", "refused")
    REPORT_ID_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    report_id: int
    refused: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, report_id: _Optional[int] = ..., refused: _Optional[_Iterable[str]] = ...) -> None: ...

class InstallKernels(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[KernelEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[KernelEntry, _Mapping]]] = ...) -> None: ...

class EvictKernels(_message.Message):
    __slots__ = ("slot_keys",)
    SLOT_KEYS_FIELD_NUMBER: _ClassVar[int]
    slot_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, slot_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class ListKernelsRequest(_message.Message):
    __slots__ = ("fingerprint_key", "kernel", "limit")
    FINGERPRINT_KEY_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    fingerprint_key: str
    kernel: str
    limit: int
    def __init__(self, fingerprint_key: _Optional[str] = ..., kernel: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class KernelReportView(_message.Message):
    __slots__ = ("host_id", "role", "config_hash", "config", "entry_ms", "default_ms", "at_s", "reason")
    class ConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    ENTRY_MS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MS_FIELD_NUMBER: _ClassVar[int]
    AT_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    role: str
    config_hash: str
    config: _containers.ScalarMap[str, int]
    entry_ms: float
    default_ms: float
    at_s: float
    reason: str
    def __init__(self, host_id: _Optional[str] = ..., role: _Optional[str] = ..., config_hash: _Optional[str] = ..., config: _Optional[_Mapping[str, int]] = ..., entry_ms: _Optional[float] = ..., default_ms: _Optional[float] = ..., at_s: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class KernelSlotView(_message.Message):
    __slots__ = ("chosen", "state", "reports", "hosts_pushed")
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    HOSTS_PUSHED_FIELD_NUMBER: _ClassVar[int]
    chosen: KernelEntry
    state: str
    reports: _containers.RepeatedCompositeFieldContainer[KernelReportView]
    hosts_pushed: int
    def __init__(self, chosen: _Optional[_Union[KernelEntry, _Mapping]] = ..., state: _Optional[str] = ..., reports: _Optional[_Iterable[_Union[KernelReportView, _Mapping]]] = ..., hosts_pushed: _Optional[int] = ...) -> None: ...

class ListKernelsResponse(_message.Message):
    __slots__ = ("slots", "flagged_hosts", "total_slots")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_HOSTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SLOTS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[KernelSlotView]
    flagged_hosts: _containers.RepeatedScalarFieldContainer[str]
    total_slots: int
    def __init__(self, slots: _Optional[_Iterable[_Union[KernelSlotView, _Mapping]]] = ..., flagged_hosts: _Optional[_Iterable[str]] = ..., total_slots: _Optional[int] = ...) -> None: ...

class KernelRequest(_message.Message):
    __slots__ = ("slot_key",)
    SLOT_KEY_FIELD_NUMBER: _ClassVar[int]
    slot_key: str
    def __init__(self, slot_key: _Optional[str] = ...) -> None: ...

class PinKernelRequest(_message.Message):
    __slots__ = ("slot_key", "from_host_id")
    SLOT_KEY_FIELD_NUMBER: _ClassVar[int]
    FROM_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    slot_key: str
    from_host_id: str
    def __init__(self, slot_key: _Optional[str] = ..., from_host_id: _Optional[str] = ...) -> None: ...

class EvictKernelResponse(_message.Message):
    __slots__ = ("agents_told",)
    AGENTS_TOLD_FIELD_NUMBER: _ClassVar[int]
    agents_told: int
    def __init__(self, agents_told: _Optional[int] = ...) -> None: ...
