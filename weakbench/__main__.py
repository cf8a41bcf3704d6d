from weakbench.cli import main

main()
