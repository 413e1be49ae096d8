#!/usr/bin/env python3
# Samples every 0.5 s until SIGTERM, into the file given: CPU % of `corral sync push` (master),
# ssh, sshd and `corral sync serve` (processes whose command line names $WORK), and the busy %
# and read/write MB/s of the disk $DISK (default vda). Used by abcopy.sh.
import os, sys, time, signal
out = open(sys.argv[1], 'w')
HZ = os.sysconf('SC_CLK_TCK')
def procs():
    r = {}
    for p in os.listdir('/proc'):
        if not p.isdigit(): continue
        try:
            cmd = open(f'/proc/{p}/cmdline','rb').read().split(b'\0')
            st = open(f'/proc/{p}/stat').read()
        except OSError: continue
        c = b' '.join(cmd)
        if os.environ.get('WORK', '/var/tmp').encode() not in c and b'sshd' not in c: continue
        f = st.rsplit(')',1)[1].split()
        cpu = int(f[11]) + int(f[12])
        if b'sync serve' in c and b'corral' in cmd[0]: k='serve'
        elif b'sync push' in c and b'corral' in cmd[0] and b'time' not in cmd[0]: k='master'
        elif cmd[0].endswith(b'/ssh') or cmd[0] == b'ssh': k='ssh'
        elif cmd[0].startswith(b'sshd') or b'sshd:' in cmd[0]: k='sshd'
        else: continue
        r[p] = (k, cpu)
    return r
def disk():
    for l in open('/proc/diskstats'):
        f = l.split()
        if f[2] == os.environ.get('DISK', 'vda'): return int(f[5]), int(f[9]), int(f[12])
    return 0, 0, 0
stop = False
def h(*a):
    global stop; stop = True
signal.signal(signal.SIGTERM, h)
prev = procs(); pd = disk(); pt = time.time(); t0 = pt
while not stop:
    time.sleep(0.5)
    now = procs(); d = disk(); t = time.time(); dt = t - pt
    agg = {}
    for p,(k,c) in now.items():
        c0 = prev.get(p, (k, c if p in prev else 0))[1] if p in prev else 0
        agg[k] = agg.get(k,0) + (c - c0)
    line = f"{t-t0:6.1f} " + " ".join(f"{k}={100*agg.get(k,0)/HZ/dt:4.0f}%" for k in ('master','ssh','sshd','serve'))
    line += f"  disk busy={100*(d[2]-pd[2])/1000/dt:4.0f}% rd={(d[0]-pd[0])*512/dt/1e6:5.0f}MB/s wr={(d[1]-pd[1])*512/dt/1e6:5.0f}MB/s"
    out.write(line + "\n"); out.flush()
    prev, pd, pt = now, d, t
