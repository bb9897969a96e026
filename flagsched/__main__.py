from flagsched.cli import main

main()
