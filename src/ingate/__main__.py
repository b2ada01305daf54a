from ingate.cli import main

main()
