from weakbench.platform.cli import main

main()
