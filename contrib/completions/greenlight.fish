complete -c greenlight -l host -d 'Address to listen on' -r
complete -c greenlight -l port -d 'Port to listen on; 0 picks a free one (the `starting server` log line shows it)' -r
complete -c greenlight -l env -d 'Environment reported by the healthcheck' -r -f -a "development\t'Local development'
staging\t'Pre-production'
production\t'Production'"
complete -c greenlight -l admin-addr -d 'Address of the admin listener (`/readyz`, `/livez`), IPv4 `ADDR:PORT` or `[IPv6]:PORT`; off unless given (or passed by systemd as a socket named `admin`)' -r
complete -c greenlight -l drain-delay -d 'Lame duck after SIGINT/SIGTERM: keep accepting and serving this long (every response saying `Connection: close`, /readyz saying 503) so load balancers move away, then drain' -r
complete -c greenlight -l upgrade-timeout -d 'How long an upgrade (SIGHUP) waits for the new process to be ready before giving up, killing it, and serving on' -r
complete -c greenlight -l shutdown-timeout -d 'Grace period for in-flight requests after SIGINT/SIGTERM (after the drain delay)' -r
complete -c greenlight -l read-timeout -d 'A request (head and body) must arrive within this, counted from its first byte (from the accept for a new connection); else 408. 0 disables it' -r
complete -c greenlight -l write-timeout -d 'A response must be written within this, else the connection is closed. 0 disables it' -r
complete -c greenlight -l idle-timeout -d 'A keep-alive connection idle this long is closed. 0 disables it' -r
complete -c greenlight -l healthcheck-delay -d 'The healthcheck answers after this delay, without blocking the loop (a demo of draining)' -r
complete -c greenlight -l log-format -d 'Log line format' -r -f -a "term\t'Human-readable lines (slog-term)'
json\t'One JSON object per line, with `msg`, `level` and `ts`'"
complete -c greenlight -l log-level -d 'Lowest level logged' -r -f -a "debug\t'Per-connection events too'
info\t'Life-cycle events and problems'
warning\t'Problems only'
error\t'Failures only'"
complete -c greenlight -l max-request-line -d 'Longest request line (method, target, version) in bytes, else 414' -r
complete -c greenlight -l max-header-bytes -d 'Largest request header section in bytes, request line included, else 431' -r
complete -c greenlight -l max-body-bytes -d 'Largest request body in bytes, else 413 (decided from Content-Length before the body is read)' -r
complete -c greenlight -l workers -d 'Worker loops (threads), each serving its share of the connections; `auto` runs one per CPU this process may use' -r
complete -c greenlight -l max-connections -d 'Connections held at once by the whole process; a connection over it is closed at once. `auto`: as many as the descriptor limit allows (greenlight raises its soft limit to the hard one); a number above that is lowered to it, with a warning' -r
complete -c greenlight -s h -l help -d 'Print help (see more with \'--help\')'
complete -c greenlight -s V -l version -d 'Print version'
