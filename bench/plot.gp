# Draws the SVGs of docs/benchmarks/ from bench.py's data (bench/run.sh --plot runs it):
#   gnuplot -e "data='bench/out'; out='docs/benchmarks'" bench/plot.gp
# scaling.tsv (bench.py --mode scaling): workers, label, keep-alive req/s, keep-alive CPU us/req,
#   close req/s, close CPU us/req, keep-alive CPUs busy, close CPUs busy; one row per worker count.
# latency-<load>.tsv (bench.py --mode latency): percentile, greenlight us, nginx us.
if (!exists("data")) data = 'bench/out'
if (!exists("out")) out = 'docs/benchmarks'

set terminal svg size 860,440 dynamic enhanced font "sans,12" background rgb "white"
set datafile separator "\t"
set grid ytics
set border 3
set tics nomirror

scaling = data.'/scaling.tsv'

# --- req/s and CPU per request by worker count ---
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.75 border -1
set boxwidth 0.8
set yrange [0:*]
set offsets 0, 0, graph 0.12, 0
set key off
set bmargin 5   # room for the three-line tic labels (workers, CPUs, shared)

set output out.'/scaling-rps.svg'
set multiplot layout 1,2 title "greenlight req/s by worker count (median of rounds)"
set title "keep-alive"
set ylabel "requests / s"
plot scaling using 3:xtic(2) skip 1 lc rgb "#2b7bba", \
     '' using ($0):3:(sprintf("%.0f", $3)) skip 1 with labels offset 0,0.8 notitle
set title "Connection: close"
plot scaling using 5:xtic(2) skip 1 lc rgb "#d9822b", \
     '' using ($0):5:(sprintf("%.0f", $5)) skip 1 with labels offset 0,0.8 notitle
unset multiplot

set output out.'/scaling-cpu.svg'
set multiplot layout 1,2 title "greenlight server CPU per request by worker count (utime + stime; median of rounds)"
set title "keep-alive"
set ylabel "CPU us / request"
plot scaling using 4:xtic(2) skip 1 lc rgb "#2b7bba", \
     '' using ($0):4:(sprintf("%.2f", $4)) skip 1 with labels offset 0,0.8 notitle
set title "Connection: close"
plot scaling using 6:xtic(2) skip 1 lc rgb "#d9822b", \
     '' using ($0):6:(sprintf("%.2f", $6)) skip 1 with labels offset 0,0.8 notitle
unset multiplot

# --- latency distribution, greenlight against nginx ---
# x is 1 / (1 - percentile), on a log scale, so the tail gets the room (HdrHistogram's layout).
reset
set terminal svg size 760,420 dynamic enhanced font "sans,12" background rgb "white"
set datafile separator "\t"
set grid xtics ytics
set border 3
set tics nomirror
set logscale xy
set xrange [1:200000]
set xtics ("0%%" 1, "50%%" 2, "90%%" 10, "99%%" 100, "99.9%%" 1000, "99.99%%" 10000, "99.999%%" 100000)
set xlabel "percentile"
set ylabel "latency (us, log scale)"
set key top left
x(p) = 1 / (1 - p / 100.0)

do for [load in "keepalive close"] {
    file = data.'/latency-'.load.'.tsv'
    set output out.'/latency-'.load.'.svg'
    set title sprintf("latency distribution, %s -c50, greenlight --workers 1 and nginx (one process) on CPU 0, wrk on CPU 1", \
                      load eq "close" ? "Connection: close" : "keep-alive") font ",11"
    plot file using (x($1)):2 skip 1 with linespoints pt 7 ps 0.6 lw 2 lc rgb "#2b7bba" title "greenlight", \
         file using (x($1)):3 skip 1 with linespoints pt 5 ps 0.6 lw 2 lc rgb "#009e73" title "nginx"
}
