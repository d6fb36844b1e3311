from egress_auditor.cli import main

main()
