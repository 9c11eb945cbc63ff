"""Local infrastructure for development and tests: Kafka and Jaeger without Docker.

`deploy.kafka` fetches Apache Kafka from Maven Central and runs a single KRaft node on
loopback; `deploy.jaeger` builds Jaeger v2 from the Go module proxy and runs it with memory
storage on loopback. Both keep what they download or build under the user's cache directory
(`$XDG_CACHE_HOME/saga-engine`, else `~/.cache/saga-engine`), so only the first run is slow.

The package uses the standard library only, so it works before the project's virtualenv
exists. Errors share one root:

    InfraError
    ├── ToolMissingError    java, mvn or go is not on PATH
    ├── PortInUseError      a requested port is taken by another process
    ├── FetchError          Maven or the Go build failed
    └── StartError          the process exited or did not become ready in time
"""

from deploy._proc import FetchError, InfraError, PortInUseError, StartError, ToolMissingError

__all__ = ["FetchError", "InfraError", "PortInUseError", "StartError", "ToolMissingError"]
